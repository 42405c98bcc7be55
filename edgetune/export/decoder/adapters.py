"""Runtime-switchable LoRA adapters: one exported base graph, one ``<name>.onnx_adapter`` per adapter.

onnxruntime-genai 0.15.2's builder only *bakes* a LoRA into the graph (``adapter_path``). To keep
adapters separate, the export runs the builder once with a zero "probe" LoRA (rank 1) on the union
of the modules the adapters target, records which ``lora_A``/``lora_B`` MatMul the builder made for
each module, and turns their weights into graph inputs with a symbolic rank (one per module) and a
zero-size default, so the graph without an adapter computes exactly the base model. Each adapter is
then written with ``onnxruntime.AdapterFormat``: ``lora_A`` as ``A.T`` [in, r] and ``lora_B`` as
``(scaling * B).T`` [r, out] (the layout the builder uses), and activated at run time with
``og.Adapters`` + ``generator.set_active_adapter`` (or ``RunOptions.add_active_adapter``).

Only plain LoRA on the linear layers of the decoder blocks is accepted. DoRA is refused: the
builder's LoRA graph has no magnitude vector, so the result would be silently wrong; merge first.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ... import artifacts, console
from ...cleanup import temp_dir
from ...errors import BadInput, CheckFailed, require
from ...quant import algorithms

ADAPTER_SUFFIX = ".onnx_adapter"
INDEX = "adapters.json"
INDEX_FORMAT = 1
CHECK_PROMPTS = ("The capital of France is", "Turn on the kitchen lights at 7 pm.")
BUILDER_QUANT = algorithms(backend="builder")  # int4/int8 made by the builder itself (its to_nbits honours nodes_to_exclude)
FP32_TOLERANCE = 1e-3  # max |logit diff| of ORT (graph + adapter file) vs PyTorch (base + PEFT adapter)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MERGE_HINT = "merge it first (edgetune merge BASE ADAPTER --out DIR) and export the merged model"
# adapter_config fields that make an adapter something other than plain LoRA on linear layers
_UNSUPPORTED = ("lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters", "layer_replication",
                "use_qalora", "alora_invocation_tokens", "fan_in_fan_out", "arrow_config", "use_bdlora",
                "kasa_config", "monteclora_config", "velora_config")


@dataclass
class LoraSpec:
    """A validated LoRA adapter folder: per targeted module its (in, out, rank, scaling)."""

    name: str
    path: Path
    config: dict
    modules: dict[str, tuple[int, int, int, float]]
    method: str  # lora | qlora (read from the finetune record)

    @property
    def rank(self) -> int:
        return max(m[2] for m in self.modules.values())


def _pattern_key(patterns, key: str) -> str:
    """peft.utils.other.get_pattern_key (same regex), without importing peft."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def _method(path: Path, cfg: dict) -> str:
    rec = artifacts.read_record(path) or {}
    opts = rec.get("options") or {}
    return "qlora" if opts.get("method") == "qlora" else "lora"


def read_lora(path: str | Path) -> LoraSpec:
    """Validate a PEFT folder as a plain LoRA adapter for a causal LM; BadInput otherwise."""
    from safetensors import safe_open

    path = Path(path)
    name = path.resolve().name
    if not path.is_dir() or not (path / "adapter_config.json").is_file():
        raise BadInput(f"{path} is not a PEFT adapter folder (no adapter_config.json)",
                       hint="give the folder written by edgetune finetune, or export a merged model (edgetune merge) without --adapter")
    from ...merge import read_adapter

    cfg = read_adapter(path)
    if not _NAME.match(name):
        raise BadInput(f"adapter folder name '{name}' cannot name an adapter", hint="rename the folder to letters, digits, '.', '_' or '-'")
    ptype = str(cfg.get("peft_type") or "").upper()
    if ptype != "LORA":
        raise BadInput(f"adapter {name} is {ptype or 'of unknown type'}, not LoRA: only LoRA adapters can be kept separate", hint=_MERGE_HINT)
    if cfg.get("use_dora"):
        raise BadInput(f"adapter {name} is DoRA (use_dora): as a separate runtime adapter it would be silently wrong", hint=_MERGE_HINT)
    if (cfg.get("task_type") or "CAUSAL_LM") != "CAUSAL_LM":
        raise BadInput(f"adapter {name} is for {cfg.get('task_type')}, not a causal LM", hint="separate adapters are for decoder LLMs")
    if cfg.get("bias", "none") != "none":
        raise BadInput(f"adapter {name} trains biases (bias={cfg.get('bias')}): only LoRA matrices can be kept separate", hint=_MERGE_HINT)
    odd = [k for k in _UNSUPPORTED if cfg.get(k)]
    if odd:
        raise BadInput(f"adapter {name} uses {', '.join(odd)}: only plain LoRA on linear layers can be kept separate", hint=_MERGE_HINT)
    shapes: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(path / "adapter_model.safetensors"), "np") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if not m:
                what = "embedding LoRA" if "lora_embedding" in key else "DoRA magnitudes" if "magnitude" in key else "non-LoRA tensors"
                raise BadInput(f"adapter {name} holds {what} ({key}): only LoRA on linear layers can be kept separate", hint=_MERGE_HINT)
            shape = list(f.get_slice(key).get_shape())
            if len(shape) != 2:
                raise BadInput(f"adapter {name}: {key} has shape {shape}, not a linear LoRA matrix", hint=_MERGE_HINT)
            shapes.setdefault(m["module"], {})[m["ab"]] = shape
    if not shapes:
        raise BadInput(f"adapter {name} has no LoRA weights", hint="give the folder written by edgetune finetune")
    modules: dict[str, tuple[int, int, int, float]] = {}
    for module, ab in sorted(shapes.items()):
        leaf = module.rsplit(".", 1)[-1]
        if "lm_head" in module or "embed" in leaf:
            raise BadInput(f"adapter {name} targets {module}: only the linear layers of the decoder blocks can be kept separate", hint=_MERGE_HINT)
        if set(ab) != {"A", "B"} or ab["A"][0] != ab["B"][1]:
            raise BadInput(f"adapter {name}: lora_A/lora_B of {module} do not pair up ({ab})", hint="the adapter file is corrupt; re-save it")
        r = ab["A"][0]
        alpha = (cfg.get("alpha_pattern") or {}).get(_pattern_key((cfg.get("alpha_pattern") or {}).keys(), module), cfg.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[module] = (ab["A"][1], ab["B"][0], r, float(scaling))
    return LoraSpec(name=name, path=path, config=cfg, modules=modules, method=_method(path, cfg))


def _base_shapes(model_dir: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                shapes[k] = list(st.get_slice(k).get_shape())
    return shapes


def check_against_base(specs: list[LoraSpec], model_dir: Path) -> None:
    shapes = _base_shapes(model_dir)
    for s in specs:
        for module, (fin, fout, _, _) in s.modules.items():
            w = shapes.get(f"{module}.weight")
            if w is None:
                raise BadInput(f"adapter {s.name} does not fit base {model_dir}: the base has no linear layer {module}",
                               hint="export with the base the adapter was trained on")
            if w != [fout, fin]:
                raise BadInput(f"adapter {s.name} does not fit base {model_dir}: {module} is {w[1]}->{w[0]} in the base, "
                               f"{fin}->{fout} in the adapter", hint="export with the base the adapter was trained on")


def _write_probe(specs: list[LoraSpec], folder: Path) -> list[str]:
    """A rank-1 zero LoRA on the union of the targeted modules (what the builder is given)."""
    import numpy as np
    from safetensors.numpy import save_file

    union: dict[str, tuple[int, int]] = {}
    for s in specs:
        for module, (fin, fout, _, _) in s.modules.items():
            union.setdefault(module, (fin, fout))
    tensors = {}
    for module, (fin, fout) in union.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.zeros((1, fin), np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.zeros((fout, 1), np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0, "bias": "none",
           "target_modules": sorted(union), "inference_mode": True, "use_dora": False, "use_rslora": False,
           "fan_in_fan_out": False, "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return sorted(union)


@contextmanager
def builder_hooks(builder, probe: Path, plan: dict[str, dict[str, Any]], *, as_inputs: bool = True) -> Iterator[None]:
    """Patch the builder for one export: LoRA (``probe``) on, its MatMuls kept float (out of int4/int8).

    With ``as_inputs`` (runtime adapters) the LoRA weights become graph inputs and ``plan`` receives,
    per targeted module, their input names; without (a fixed float adapter) the weights stay
    initializers and ``plan`` receives the lora_A/lora_B node names.
    """
    import torch

    Model = builder.Model
    saved = (builder.parse_extra_options, Model.make_matmul_lora, Model.save_model)
    nodes: dict[str, tuple[str, str]] = {}
    packed_rows: dict[str, tuple[str, int, int]] = {}

    def parse_extra_options(model_name, input_path, output_dir, precision, ep, cache_dir, extra_options):
        return saved[0](model_name, input_path, output_dir, precision, ep, cache_dir, [*(extra_options or []), f"adapter_path={probe}"])

    def make_matmul_lora(self, matmul, basename, root_input, **kwargs):
        made: list[str] = []
        real_op = self.make_matmul_op

        def op(*a, **k):
            made.append(real_op(*a, **k))
            return made[-1]

        self.make_matmul_op = op
        try:
            out = saved[1](self, matmul, basename, root_input, **kwargs)
        finally:
            del self.make_matmul_op
        if not hasattr(self, "_edgetune_modules"):
            self._edgetune_modules = {id(m): n for n, m in self.weights.named_modules()}
            # a part the builder unpacks from a packed LoRA target shares the packed module's lora_A
            self._edgetune_lora_a = {id(m.lora_A["default"]): n for n, m in self.weights.named_modules()
                                     if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and "default" in m.lora_A}
        module = self._edgetune_modules.get(id(matmul), "")
        module = module[len("base_model.model."):] if module.startswith("base_model.model.") else ""
        rows = None
        if not module and isinstance(getattr(matmul, "lora_A", None), torch.nn.ModuleDict) and "default" in matmul.lora_A:
            packed = self._edgetune_lora_a.get(id(matmul.lora_A["default"]), "")
            packed = packed[len("base_model.model."):] if packed.startswith("base_model.model.") else ""
            part = basename.split("/")[-2]  # /model/layers.N/attn/q_proj/MatMul -> q_proj
            rows = _unpacked_rows(self, packed, part) if packed else None
            module = f"{packed.rpartition('.')[0]}.{part}" if rows else ""
        if not module or len(made) < 2:
            raise BadInput(f"the ONNX builder fuses the LoRA target at {basename} with other projections "
                           "(e.g. qkv_proj/gate_up_proj), so its adapter cannot be kept separate", hint=_MERGE_HINT)
        nodes[module] = (made[0], made[1])
        if rows:
            packed_rows[module] = rows
        return out

    def save_model(self, out_dir):
        if as_inputs:
            _lora_weights_to_inputs(self, nodes, plan)
        else:
            _exclude_lora(self, nodes, plan)
        for module, (packed, start, stop) in packed_rows.items():
            plan[module].update(packed=packed, rows=[start, stop])
        return saved[2](self, out_dir)

    builder.parse_extra_options, Model.make_matmul_lora, Model.save_model = parse_extra_options, make_matmul_lora, save_model
    try:
        yield
    finally:
        builder.parse_extra_options, Model.make_matmul_lora, Model.save_model = saved


def _unpacked_rows(model, packed_module: str, part: str) -> tuple[str, int, int] | None:
    """(packed module, first row, end row) of ``part`` (q_proj, ..., up_proj), which the builder unpacked from
    the LoRA target ``packed_module`` (qkv_proj, gate_up_proj) exactly: the packed A shared, B's row block of the
    part (make_attention_unpacked_lora / make_mlp_unpacked_lora); None for another pairing."""
    from .packed import PART_OF, part_rows

    packed = packed_module.rpartition(".")[2]
    if PART_OF.get(part) != packed:
        return None
    q, kv = int(model.q_size), int(model.kv_size)
    rows = part_rows(part, q + 2 * kv if packed == "qkv_proj" else 2 * int(model.intermediate_size), q, kv)
    return packed_module, rows.start, rows.stop


def sources(plan: dict[str, dict[str, Any]]) -> set[str]:
    """The adapter's modules the graph's LoRA branches come from (a packed one for the parts the builder unpacked)."""
    return {p.get("packed", m) for m, p in plan.items()}


def _exclude_lora(model, nodes: dict[str, tuple[str, str]], plan: dict[str, dict[str, Any]]) -> None:
    """Keep a baked LoRA's MatMuls out of the builder's int4/int8 pass (``to_nbits`` honours nodes_to_exclude)."""
    exclude = model.quant_attrs.setdefault("nodes_to_exclude", []) if isinstance(getattr(model, "quant_attrs", None), dict) else []
    for module, (a_name, b_name) in sorted(nodes.items()):
        exclude.extend([a_name, b_name])
        plan[module] = {"lora_A": a_name, "lora_B": b_name}


def _lora_weights_to_inputs(model, nodes: dict[str, tuple[str, str]], plan: dict[str, dict[str, Any]]) -> None:
    import numpy as np
    import onnx_ir as ir

    graph = model.model.graph
    by_name = {n.name: n for n in graph}
    np_types = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}
    exclude = model.quant_attrs.setdefault("nodes_to_exclude", []) if isinstance(getattr(model, "quant_attrs", None), dict) else []
    for module, (a_name, b_name) in sorted(nodes.items()):
        a, b = by_name[a_name], by_name[b_name]
        wa, wb = a.inputs[1], b.inputs[1]
        if wa is None or wb is None or wa.const_value is None or wb.const_value is None:
            raise BadInput(f"unexpected LoRA graph for {module} (no weight initializer)", hint=_MERGE_HINT)
        if wa.dtype not in np_types:
            raise BadInput(f"separate adapters need float32 or float16 graph inputs, this export uses {wa.dtype.name}",
                           hint="use --precision fp32, fp16 or int4")
        dt = np_types[wa.dtype]
        rank = f"lora_rank:{module}"  # one symbolic rank per module: adapters may cover different modules and ranks
        fin, fout = int(wa.shape[0]), int(wb.shape[1])
        wa.shape, wb.shape = ir.Shape([fin, rank]), ir.Shape([rank, fout])
        wa.const_value = ir.tensor(np.zeros((fin, 0), dt), name=wa.name)  # zero-size default: no adapter = the base
        wb.const_value = ir.tensor(np.zeros((0, fout), dt), name=wb.name)
        out = a.outputs[0]
        if out.shape is not None:
            out.shape = ir.Shape([*list(out.shape)[:-1], rank])
        graph.inputs.extend([wa, wb])
        exclude.extend([a.name, b.name])  # int4/int8: keep the LoRA MatMuls float, they take the adapter's weights
        plan[module] = {"lora_A": wa.name, "lora_B": wb.name, "in": fin, "out": fout, "dtype": np.dtype(dt).name}


def write_adapter(spec: LoraSpec, plan: dict[str, dict[str, Any]], path: Path) -> dict[str, Any]:
    """``<name>.onnx_adapter``: A.T [in, r] and (scaling * B).T [r, out] under the graph input names."""
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file

    tensors = load_file(str(spec.path / "adapter_model.safetensors"))
    byrole: dict[tuple[str, str], Any] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        byrole[(m["module"], m["ab"])] = value
    params = {}
    for node_module, p in sorted(plan.items()):
        module = p.get("packed", node_module)  # a part the builder unpacked: the packed LoRA's A, its rows of B
        if module not in spec.modules:
            continue
        scaling = spec.modules[module][3]
        dt = np.dtype(p["dtype"])
        bw = byrole[(module, "B")].astype(np.float32)
        if "rows" in p:
            bw = bw[p["rows"][0]:p["rows"][1]]
        a = np.ascontiguousarray(byrole[(module, "A")].astype(np.float32).T.astype(dt))
        b = np.ascontiguousarray((bw * scaling).T.astype(dt))
        params[p["lora_A"]] = ort.OrtValue.ortvalue_from_numpy(a)
        params[p["lora_B"]] = ort.OrtValue.ortvalue_from_numpy(b)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    fmt.export_adapter(str(path))
    # read back: names are graph inputs, shapes fit the graph
    back = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    inputs = {p["lora_A"]: p for p in plan.values()} | {p["lora_B"]: p for p in plan.values()}
    for pname, value in back.items():
        p = inputs.get(pname)
        shape = list(value.shape())
        if p is None or (pname == p["lora_A"] and shape[0] != p["in"]) or (pname == p["lora_B"] and shape[1] != p["out"]):
            raise CheckFailed(f"{path.name}: parameter {pname} {shape} does not fit the exported graph")
    return {"name": spec.name, "file": path.name, "sha256": artifacts.hash_path(spec.path), "file_sha256": artifacts.sha256_file(path),
            "method": spec.method, "rank": spec.rank, "lora_alpha": spec.config.get("lora_alpha"),
            "use_rslora": bool(spec.config.get("use_rslora")), "modules": len(spec.modules),
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in spec.modules}), "parameters": len(params),
            "size_kb": round(path.stat().st_size / 1024, 1)}


def check_adapters(folder: Path, model_dir: Path, specs: list[LoraSpec], *, strict: bool) -> dict[str, Any]:
    """Logits of the export with each adapter file (onnxruntime) vs PyTorch base + that PEFT adapter (unmerged)."""
    import numpy as np

    torch = require("torch", purpose="adapter check")
    transformers = require("transformers", purpose="adapter check")
    peft = require("peft", purpose="adapter check")
    from ...device import llm as dev

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tok(p, return_tensors="pt")["input_ids"] for p in CHECK_PROMPTS]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()
    model = peft.PeftModel.from_pretrained(base, str(specs[0].path), adapter_name=specs[0].name).eval()
    for s in specs[1:]:
        model.load_adapter(str(s.path), adapter_name=s.name)
    llm = dev.load(folder)
    figures: dict[str, Any] = {}
    for name in [None, *(s.name for s in specs)]:
        dev.set_adapter(llm, name)
        worst, agree, n = 0.0, 0, 0
        with torch.no_grad():
            for ids in prompts:
                if name is None:
                    with model.disable_adapter():
                        want = model(ids).logits[0].float().numpy()
                else:
                    model.set_adapter(name)
                    want = model(ids).logits[0].float().numpy()
                got = dev.logits(llm, ids[0].numpy())
                worst = max(worst, float(np.abs(got - want).max()))
                agree += int((got.argmax(-1) == want.argmax(-1)).sum())
                n += want.shape[0]
        figures[name or "(base)"] = {"max_abs_diff": worst, "top1_agreement": agree / n}
    bad = {k: v for k, v in figures.items() if v["max_abs_diff"] > FP32_TOLERANCE}
    if strict and bad:
        k, v = next(iter(bad.items()))
        raise CheckFailed(f"adapter check failed: with {k} the export differs from PyTorch base + adapter by "
                          f"max|dlogit|={v['max_abs_diff']:.3g} (> {FP32_TOLERANCE})", result=figures)
    return {"reference": "PyTorch base + unmerged PEFT adapter, float32", "prompts": len(prompts),
            "tolerance": FP32_TOLERANCE if strict else None, "passed": not bad if strict else None, "adapters": figures}


def export_with_adapters(model_dir: Path, out: Path, *, target, precision: str, int4=None, adapters=(), calibration=None,
                         base_export: Callable[..., Path]) -> Path:
    """``edgetune export BASE --adapter A1 --adapter A2``: the base graph once, one .onnx_adapter per adapter.

    ``base_export``: makes the base graph (:func:`edgetune.export.decoder.dispatch.base_export`), with the builder hooked here.
    """
    from ...plan import int4_plan
    from ...targets import resolve

    model_dir, out = Path(model_dir), Path(out)
    t = resolve(target)
    int4 = int4_plan(t, int4)
    if precision == "bf16":
        raise BadInput("separate adapters need float32 or float16 graph inputs, bf16 has no numpy type to write them with",
                       hint="use --precision fp32, fp16 or int4")
    algorithm = int4.options["algorithm"] if precision in ("int4", "int8") else None
    if algorithm not in (None, *BUILDER_QUANT):
        # awq rescales the inputs the LoRA reads; hqq/gptq re-quantize the fp32 graph without knowing the
        # LoRA MatMuls; inc-* feed the builder a GPTQ-layout checkpoint that peft cannot wrap
        raise BadInput(f"separate adapters work with the builder's own int4 algorithms ({', '.join(BUILDER_QUANT)}), not '{algorithm}'",
                       hint=f"use --int4-algorithm rtn or k_quant, or {_MERGE_HINT}")
    specs = [read_lora(a) for a in adapters]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInput(f"two adapters are named '{dup[0]}' (an adapter is named after its folder)", hint="rename one of the folders")
    check_against_base(specs, model_dir)
    builder = require("onnxruntime_genai.models.builder", purpose="LLM export")
    inputs: dict[str, Any] = {"model": model_dir, **{f"adapter.{s.name}": s.path for s in specs}}
    options = {"precision": precision, "int4": int4.overrides, "adapters": names, "adapter_format": INDEX_FORMAT,
               "target": t.model_dump(mode="json", exclude={"source"})}
    with artifacts.stage_output(out, "export", inputs=inputs, options=options) as run, \
            temp_dir("lora") as scratch:
        plan: dict[str, dict[str, Any]] = {}
        probe = Path(scratch) / "probe"
        union = _write_probe(specs, probe)
        with builder_hooks(builder, probe, plan):
            base_export(model_dir, run.dir, target=t, precision=precision, int4=int4, calibration=calibration)
        missing = sorted(set(union) - sources(plan))
        if missing:
            raise BadInput(f"the ONNX builder made no LoRA graph for {missing[0]}", hint=_MERGE_HINT)
        inner = artifacts.read_record(run.dir) or {}
        with console.step(f"write {len(specs)} adapter file(s)"):
            written = [write_adapter(s, plan, run.dir / f"{s.name}{ADAPTER_SUFFIX}") for s in specs]
        index = {"format": INDEX_FORMAT, "adapters": {w["name"]: {k: w[k] for k in ("file", "sha256", "rank", "method")} for w in written},
                 "parameters": {m: {"lora_A": p["lora_A"], "lora_B": p["lora_B"], "dtype": p["dtype"]} for m, p in sorted(plan.items())}}
        artifacts.write_json(run.dir / INDEX, index)
        results = dict(inner.get("results") or {})
        check = None
        if t.runtime.resolved_builder_provider == "cpu":
            with console.step("adapter check (onnxruntime vs PyTorch + PEFT)"):
                check = check_adapters(run.dir, model_dir, specs, strict=precision == "fp32")
        results.update(adapters=written, adapter_inputs=2 * len(plan), adapter_check=check,
                       adapters_size_mb=round(sum(w["size_kb"] for w in written) / 1024, 3),
                       base_export_options={k: v for k, v in (inner.get("options") or {}).items() if k != "target"})
        run.results.update(results)
    return out
