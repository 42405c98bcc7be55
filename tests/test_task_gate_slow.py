"""The demo build with a deliberately poor int4 recipe is rejected by the task gate (real SmolLM2).

Reuses the demo build's fine-tune (the ``demo_build`` fixture runs ``make demo``'s build once, or
reuses its cache in ``build/smollm2-lora-cpu/.work``). Only the export of the merged model, the
validation (the 40 task examples, no latency run) and the bundle run: a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from edgetune.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "smollm2-lora-cpu.toml"
POOR = 'extends = "cpu-x86"\nname = "cpu-x86"\n[quantization.int4]\nalgorithm = "rtn"\nblock_size = 256\nlm_head = "int4"\n'


def test_poor_int4_recipe_is_rejected_by_the_task_gate(tmp_path, demo_build, capsys):
    work = demo_build["work"]
    assert (work / "merged").is_dir() and (work / "state" / "merge.json").is_file(), demo_build["summary"]
    out = tmp_path / "out"
    (out / ".work" / "state").mkdir(parents=True)
    for name in ("adapter", "merged", "task-base"):  # the cached stages, linked (not copied: the merged model is large)
        if (work / name).is_dir():
            os.symlink(work / name, out / ".work" / name)
    for name in ("finetune", "merge", "task.base"):
        if (work / "state" / f"{name}.json").is_file():
            (out / ".work" / "state" / f"{name}.json").write_text((work / "state" / f"{name}.json").read_text())
    (tmp_path / "poor.toml").write_text(POOR)
    text = DEMO.read_text()
    cfg = tomllib.loads(text)
    ex = DEMO.parent
    text = text.replace(f'output = "{cfg["output"]}"', f'output = "{out}"')
    text = text.replace(f'train = "{cfg["data"]["train"]}"', f'train = "{ex / cfg["data"]["train"]}"')
    text = text.replace(f'data = "{cfg["validate"]["data"]}"', f'data = "{ex / cfg["validate"]["data"]}"')
    text = text.replace(f'prompts = "{cfg["validate"]["prompts"]}"', f'prompts = "{ex / cfg["validate"]["prompts"]}"')
    tgt = cfg["targets"][0]
    for key in ("precision", "adapter"):  # the poor recipe re-quantizes the merged model
        if key in tgt:
            text = text.replace(f'{key} = "{tgt[key]}"', "", 1)
    text = text.replace(f'name = "{tgt["name"]}"', f'name = "{tmp_path / "poor.toml"}"\nprecision = "int4"', 1)
    text = text.replace("[validate]", "[validate]\nlatency = false", 1)
    (tmp_path / "build.toml").write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["build", str(tmp_path / "build.toml"), "--json", "--quiet"])
    res = json.loads(capsys.readouterr().out)
    assert exc.value.code == 1
    status = {s["stage"]: s["status"] for s in res["stages"]}
    assert status["finetune"] == "skipped" and status["merge"] == "skipped"  # the cached fine-tune was reused
    row = res["targets"][0]
    assert "task_accuracy_drop" in row["result"], row
    assert row["task_figures"]["drop"] > 2 and row["task_figures"]["finetuned"] >= 90
    assert (out / "rejected" / "cpu-x86" / "manifest.json").is_file() and not (out / "cpu-x86").exists()
    rep = json.loads((out / "rejected" / "cpu-x86" / "validation" / "report.json").read_text())
    assert rep["task"]["failing_examples"] and "task_accuracy_drop" in rep["failed"]
