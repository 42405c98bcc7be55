"""Build: validation data must be held out (refuse or split off overlap); cross-builds for a
board this host lacks (accuracy on the CPU provider, latency not measured, --require-device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune.bundle import verify
from test_build import run_cli  # the same CLI runner (exit code, stdout, stderr)

TEXTS = [f"message number {i} about {w}" for i, w in enumerate(["lights", "music", "doors", "blinds", "heating"] * 8)]

CONFIG = """
name = "tiny-enc"
output = "out"

[model]
base = "{base}"

[data]
train = "data.tsv"

[finetune]
method = "lora"
task = "seq-cls"
max_steps = 2
batch_size = 8
max_seq_len = 32
save_steps = 10
eval_fraction = 0.0
limit = 20

[[targets]]
name = "{target}"
precision = "{precision}"
archive = false
{calib}

[validate]
data = "data.tsv"
repeats = 2
warmup = 0
{extra}
"""


def write(root: Path, base: Path, *, target="cpu-x86", precision="fp32", calib="", extra="") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.tsv").write_text("label\ttext\n" + "".join(f"{'on' if i % 2 else 'off'}\t{t}\n" for i, t in enumerate(TEXTS)))
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    # encoder budgets only: a random tiny classifier is not expected to be accurate, only the same as its reference
    (root / "fpga.toml").write_text('extends = "fpga-vitisai"\nname = "fpga-vitisai"\n[budgets]\nmax_accuracy_drop = 100\nmax_size_mb = 100\n')
    cfg = root / "build.toml"
    cfg.write_text(CONFIG.format(base=base, target=target, precision=precision, calib=calib, extra=extra))
    return cfg


def test_overlapping_validation_data_is_refused_before_any_work(tmp_path, tiny_bert, capsys):
    cfg = write(tmp_path, tiny_bert)
    code, _, err = run_cli(["build", str(cfg)], capsys)
    assert code == 2
    assert "20 of 40 validation examples also occur in the training data" in err and "rows" in err
    assert not (tmp_path / "out" / ".work" / "adapter").exists()  # refused before fine-tuning
    # a range that overlaps a little is refused too (case and whitespace do not hide a copy)
    (tmp_path / "build.toml").write_text((tmp_path / "build.toml").read_text().replace('data = "data.tsv"\nrepeats', 'data = "data.tsv"\nrows = "15-40"\nrepeats'))
    code, _, err = run_cli(["build", str(cfg)], capsys)
    assert code == 2 and "6 of 26 validation examples" in err


def test_rows_split_off_the_held_out_part(tmp_path, tiny_bert):
    from edgetune.build import load_config
    from edgetune.build.runner import Build
    from edgetune.build.stages import held_out as _held_out

    cfg = write(tmp_path, tiny_bert, extra='rows = "21-"')
    c, root = load_config(cfg)
    b = Build(c, root)
    path, info = _held_out(b, root / "data.tsv", root / "data.tsv")
    assert info == {"file": str(root / "data.tsv"), "rows": "21-", "examples": 20, "overlap": 0, "dropped": 0}
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in recs] == TEXTS[20:]
    # drop_overlap: the overlapping ones are split off explicitly and counted
    cfg = write(tmp_path, tiny_bert, extra='rows = "11-40"\ndrop_overlap = true')
    c, root = load_config(cfg)
    path, info = _held_out(Build(c, root), root / "data.tsv", root / "data.tsv")
    assert info["overlap"] == info["dropped"] == 10 and info["examples"] == 20


def test_cross_build_for_a_missing_provider(tmp_path, tiny_bert, capsys):
    import onnxruntime as ort

    if "VitisAIExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the Vitis AI EP")
    cfg = write(tmp_path, tiny_bert, target="fpga.toml", precision="int8-static", calib='calibration = "calib.jsonl"', extra='rows = "21-"')
    code, out, err = run_cli(["build", str(cfg), "--json", "--quiet"], capsys)
    assert code == 0, err
    res = json.loads(out)
    row = res["targets"][0]
    assert row["result"] == "pass" and row["latency"].startswith("not measured") and row["device"]["accuracy_on"] == "CPUExecutionProvider"
    bundle = tmp_path / "out" / "fpga-vitisai"
    assert verify(bundle)["ok"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["figures"]["device"]["latency"] == "not measured" and m["figures"]["latency"] == {}
    rep = json.loads((bundle / "validation" / "report.json").read_text())
    assert rep["device"]["available"] is False and "p90_ms" in rep["not_measured"] and rep["latency"] is None
    assert rep["task"]["reference"] is not None and rep["task"]["drop"] is not None  # accuracy was validated (on CPU)
    assert "not measured" in (bundle / "validation" / "report.md").read_text()
    # on the board itself: a missing provider is fatal
    code, _, err = run_cli(["build", str(cfg), "--require-device"], capsys)
    assert code == 3 and "VitisAIExecutionProvider" in err
