"""One way to read, walk, edit and write an ONNX graph: every host-side module that opens a ``model.onnx`` goes
through here (decoder exports, their quantizers and fusions, the encoder's quantizers and checks).

* :func:`read` is the graph without its weights (node names, ops, attributes, shapes: what checks and records
  read, in milliseconds even for a 4B model); :func:`load` is the whole model, weights included.
* :func:`save` writes a model. ``external=True`` is the decoder folder's form: every tensor over
  ``size_threshold`` bytes in one ``model.onnx.data`` next to it (any older pair removed first: onnx appends to an
  existing data file); a model read with :func:`read` and saved without ``external`` rewrites only the graph, its
  external weights staying where they are.
* :class:`Graph` indexes a loaded graph once: initializers, the producer and consumers of each tensor, the graph
  outputs, and the value of any constant (an initializer, a Constant node, a Cast of an initializer).
* :func:`set_nodes` puts a graph's new node list in place (topological order, unused initializers dropped).

Host only (``onnx`` is not a device dependency); imported lazily from stage code.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

DATA = "model.onnx.data"  # the decoder folders' one external-data file
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulNBits, GatherBlockQuantized, ...)


def read(path: str | Path):
    """The model at ``path`` without loading its external weights."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def load(path: str | Path):
    """The model at ``path`` with its weights (external data resolved next to it)."""
    import onnx

    return onnx.load(str(path))


def save(model, path: str | Path, *, external: bool = False, size_threshold: int = 0) -> None:
    """Write ``model`` to ``path``; ``external``: its tensors over ``size_threshold`` bytes into ``model.onnx.data``
    beside it (an existing one is removed first, as onnx would append to it)."""
    import onnx

    path = Path(path)
    if not external:
        onnx.save_model(model, str(path))
        return
    for f in (path, path.parent / DATA):
        f.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA,
                    size_threshold=size_threshold)


def attributes(node) -> dict[str, Any]:
    """A node's attributes as Python values."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class Graph:
    """A loaded graph, indexed once (the indexes are built when first asked for and not kept up to date: build a
    new ``Graph`` after editing)."""

    def __init__(self, model):
        self.model = model
        self.g = model.graph if hasattr(model, "graph") else model
        self._values: dict[str, np.ndarray | None] = {}

    @cached_property
    def initializers(self) -> dict[str, Any]:
        """Every initializer by name (TensorProto)."""
        return {i.name: i for i in self.g.initializer}

    @cached_property
    def constants(self) -> dict[str, Any]:
        """The initializers that are constants: not also a graph input (a caller may override those)."""
        inputs = {i.name for i in self.g.input}
        return {n: t for n, t in self.initializers.items() if n not in inputs}

    @cached_property
    def producer(self) -> dict[str, Any]:
        """Tensor name -> the node that writes it."""
        return {o: n for n in self.g.node for o in n.output}

    @cached_property
    def consumers(self) -> dict[str, list]:
        """Tensor name -> the nodes that read it, in graph order."""
        out: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                out.setdefault(i, []).append(n)
        return out

    @cached_property
    def outputs(self) -> set[str]:
        return {o.name for o in self.g.output}

    def array(self, name: str) -> np.ndarray:
        """An initializer's value."""
        from onnx import numpy_helper

        return numpy_helper.to_array(self.initializers[name])

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor: a constant initializer, a Constant node, or a Cast of a constant
        initializer to float32; None for anything computed."""
        if name in self._values:
            return self._values[name]
        from onnx import numpy_helper

        val = None
        if name in self.constants:
            val = numpy_helper.to_array(self.constants[name])
        else:
            p = self.producer.get(name)
            if p is not None and p.op_type == "Constant" and len(p.attribute) == 1 and p.attribute[0].name == "value":
                val = numpy_helper.to_array(p.attribute[0].t)
            elif p is not None and p.op_type == "Cast" and p.input[0] in self.constants:
                to = next((a.i for a in p.attribute if a.name == "to"), None)
                if to == 1:  # FLOAT
                    val = numpy_helper.to_array(self.constants[p.input[0]]).astype(np.float32)
        self._values[name] = val
        return val

    def only_consumer(self, tensor: str):
        """The one node reading ``tensor``, when exactly one does and it is not a graph output; else None."""
        c = self.consumers.get(tensor, [])
        return c[0] if len(c) == 1 and tensor not in self.outputs else None


def topo_sort(nodes: list, graph) -> None:
    """Order ``nodes`` (in place) so that each is after the producers of its inputs (stable otherwise)."""
    avail = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producer = {o: nd for nd in nodes for o in nd.output}
    out, done = [], set()
    for root in nodes:
        stack = [(root, False)]
        while stack:
            nd, expanded = stack.pop()
            if id(nd) in done:
                continue
            if expanded:
                done.add(id(nd))
                out.append(nd)
                continue
            stack.append((nd, True))
            for i in reversed(nd.input):
                p = producer.get(i)
                if p is not None and id(p) not in done and i not in avail:
                    stack.append((p, False))
    nodes[:] = out


def set_nodes(graph, nodes: list, new_initializers=(), *, keep=frozenset()) -> None:
    """Make ``nodes`` the graph's nodes, in topological order, with the graph's initializers then
    ``new_initializers`` that some node reads (or ``keep`` names); the others are dropped, and so is the
    value_info of a tensor nothing makes any more."""
    topo_sort(nodes, graph)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for nd in graph.node for i in nd.input} | set(keep)
    kept = [i for i in graph.initializer if i.name in used] + [i for i in new_initializers if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    made = {o for nd in graph.node for o in nd.output} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    if any(v.name not in made for v in graph.value_info):
        vi = [v for v in graph.value_info if v.name in made]
        del graph.value_info[:]
        graph.value_info.extend(vi)


def live_nodes(nodes: list, outputs, ops: tuple[str, ...]) -> list:
    """``nodes`` less those of type ``ops`` whose outputs nothing reads, repeated until none is left (what a rewrite
    made dead)."""
    while True:
        needed = set(outputs) | {i for nd in nodes for i in nd.input}
        live = [nd for nd in nodes if nd.op_type not in ops or any(o in needed for o in nd.output)]
        if len(live) == len(nodes):
            return live
        nodes = live
