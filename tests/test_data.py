from __future__ import annotations

import json

import pytest

from edgetune.data import load_dataset, split, texts
from edgetune.errors import BadInput


def write(p, lines):
    p.write_text("\n".join(lines) + "\n")
    return p


def test_formats_are_detected(tmp_path):
    f = write(tmp_path / "a.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})])
    assert load_dataset(f).format == "messages"
    f = write(tmp_path / "b.jsonl", [json.dumps({"prompt": "p", "completion": "c"})])
    assert load_dataset(f).format == "prompt_completion"
    f = write(tmp_path / "c.tsv", ["label\ttext", "ham\thello there", "spam\tWIN now"])
    ds = load_dataset(f)
    assert ds.format == "classification" and ds.labels == ["ham", "spam"]
    f = write(tmp_path / "d.jsonl", [json.dumps({"tokens": ["Paris", "is"], "tags": ["B-LOC", "O"]})])
    assert load_dataset(f).labels == ["B-LOC", "O"]
    f = tmp_path / "e.txt"
    f.write_text("plain text\nmore")
    assert texts(load_dataset(f)) == ["plain text\nmore"]


@pytest.mark.parametrize(
    "lines, line_no",
    [
        (['{"text": "ok"}', "{not json", '{"text": "ok"}'], 2),
        (['{"text": "ok"}', '{"text": ""}'], 2),
        (['{"prompt": "p", "completion": "c"}', '{"prompt": "p", "completion": "c"}', '{"prompt": "p"}'], 3),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], 1),
        (["[1, 2]"], 1),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, lines, line_no):
    f = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(BadInput) as e:
        load_dataset(f)
    assert f"bad.jsonl:{line_no}" in str(e.value) and e.value.exit_code == 2


def test_missing_empty_and_ragged(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BadInput, match="empty"):
        load_dataset(tmp_path / "empty.jsonl")
    f = write(tmp_path / "r.tsv", ["label\ttext", "ham\thi", "spam"])
    with pytest.raises(BadInput, match=r"r.tsv:3"):
        load_dataset(f)


def test_split_is_deterministic_and_disjoint(tmp_path):
    f = write(tmp_path / "t.jsonl", [json.dumps({"text": f"line {i}"}) for i in range(50)])
    ds = load_dataset(f)
    a1, b1 = split(ds, 0.2, seed=1)
    a2, b2 = split(ds, 0.2, seed=1)
    assert a1.records == a2.records and b1.records == b2.records
    assert len(b1) == 10 and len(a1) == 40
    assert not {r["text"] for r in a1.records} & {r["text"] for r in b1.records}
