"""`edgetune quantize MODEL --target T --out DIR`: int8/fp16 for an existing encoder ONNX model.

`--coverage-only` prints the operator coverage report of MODEL against the target's
operator list instead (no output folder): which nodes the accelerator cannot take.
"""

from __future__ import annotations

from pathlib import Path

import click

from .. import console
from ..cli import common_options, force_option
from ..errors import BadInput, CheckFailed


def _human(r: dict) -> str:
    lines = [f"{r['precision']} model for {r['target']}: {r['out']}/model.onnx ({r['size_mb']} MB, was {r['source_size_mb']} MB)"]
    if r.get("calibration"):
        c = r["calibration"]
        lines.append(f"calibrated on {c['samples']} samples of {c['file']} ({r['quantization']['calibration_method']})")
    if r.get("pow2"):
        chk = r["pow2"]["check"]
        lines.append(f"power-of-two scales: {'ok' if chk['ok'] else 'FAILED'} ({chk['scale_values']} values)")
    if r.get("coverage"):
        c = r["coverage"]
        lines.append(f"operator coverage: {c['unsupported_nodes']} of {c['nodes']} nodes fall back to CPU ({c['unsupported_pct_flops']}% of FLOPs)")
    return "\n".join(lines)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", required=True, help="Target profile name or .toml path.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Output folder (required unless --coverage-only).")
@click.option("--method", type=click.Choice(["dynamic", "static", "fp16"]), help="Default: the profile's precision.encoder.")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration texts for static int8 (any file the data reader takes; default calibration/sms-like.jsonl).")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile", "distribution"]), help="Overrides the profile.")
@click.option("--per-channel/--per-tensor", default=None, help="Weight scales per output channel or per tensor (default: profile).")
@click.option("--exclude-node", multiple=True, help="Keep this node in float (repeatable).")
@click.option("--exclude-op-type", multiple=True, help="Keep every node of this op type in float (repeatable).")
@click.option("--keep-head-float", is_flag=True, help="Keep the classifier head (nodes writing the graph outputs) in float.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="Folder with tokenizer.json when MODEL is a bare .onnx file.")
@click.option("--coverage-only", is_flag=True, help="Only report which nodes the target's accelerator cannot run.")
@click.option("--timing", is_flag=True, help="With --coverage-only: add each node's share of CPU time (onnxruntime profile).")
@click.option("--fail-on-fallback", is_flag=True, help="With --coverage-only: exit 1 when any node falls back to the CPU.")
@force_option
@common_options
def quantize(model: Path, target: str, out: Path | None, method, calibration, calibration_method, per_channel,
             exclude_node, exclude_op_type, keep_head_float, tokenizer, coverage_only, timing, fail_on_fallback) -> None:
    """Quantize an encoder ONNX model (file or export folder) for a target, or report its operator coverage."""
    from ..errors import require
    from ..targets import load_target

    require("onnx", purpose="edgetune quantize (ONNX graph rewrites)")  # host extra; a device install lacks it: exit 3

    tgt = load_target(target)
    if coverage_only:
        from ..export.encoder.coverage import coverage, format_report
        from ..export.encoder.pipeline import _source

        onnx_file, _ = _source(model)
        report = coverage(onnx_file, tgt.operators.supported, batch=tgt.graph.batch_size,
                          sequence_length=tgt.graph.sequence_length, timing=timing)
        report["target"] = tgt.name
        console.emit(report, format_report)
        if fail_on_fallback and report["unsupported_nodes"]:
            raise CheckFailed(f"{report['unsupported_nodes']} node(s) of {onnx_file.name} fall back to the CPU on {tgt.name}",
                              hint="see the coverage report; replace or exclude those operators", result=report)
        return
    if out is None:
        raise BadInput("--out is required", hint="give an output folder, or use --coverage-only")
    from ..artifacts import read_record
    from ..export.encoder.pipeline import quantize_model

    path = quantize_model(model, out, target=tgt, method=method, calibration=calibration, tokenizer=tokenizer,
                          calibration_method=calibration_method, per_channel=per_channel,
                          exclude_nodes=list(exclude_node), exclude_op_types=list(exclude_op_type),
                          keep_head_float=keep_head_float)
    result = dict(read_record(path)["results"])
    result["out"] = str(path)
    console.emit(result, _human)
