"""Reproducible archives and safe extraction (crafted tarballs are refused, nothing written outside)."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from edgetune.archive import extract, pack
from edgetune.errors import BadInput


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(5000))
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o700)
    return root


def test_pack_is_byte_identical_across_mtimes_and_modes(tmp_path):
    src = _tree(tmp_path / "bundle")
    a = pack(src, tmp_path / "a.tar.gz")
    time.sleep(1.1)
    os.utime(src / "a.txt", None)
    os.chmod(src / "sub" / "b.bin", 0o600)
    b = pack(src, tmp_path / "b.tar.gz")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        names = tar.getnames()
        assert names == sorted(names) and names[0] == "bundle"
        for m in tar.getmembers():
            assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == ""
        assert tar.getmember("bundle/run.sh").mode == 0o755
        assert tar.getmember("bundle/a.txt").mode == 0o644
    assert a.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0
    # content change -> different bytes
    (src / "a.txt").write_text("beta\n")
    assert pack(src, tmp_path / "c.tar.gz").read_bytes() != a.read_bytes()


def test_roundtrip(tmp_path):
    src = _tree(tmp_path / "bundle")
    out = extract(pack(src, tmp_path / "x.tar.gz"), tmp_path / "un")
    assert (out / "bundle" / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()


def _crafted(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _link(name: str, target: str, sym: bool = True) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE if sym else tarfile.LNKTYPE
    ti.linkname = target
    return ti, None


@pytest.mark.parametrize(
    "members, words",
    [
        ([_file("ok.txt"), _file("../escaped.txt")], "escapes"),
        ([_file("ok/../../escaped.txt")], "escapes"),
        ([_file("/tmp/edgetune-abs-escape.txt")], "absolute"),
        ([_link("evil", "../../etc"), _file("evil/escaped.txt")], "link"),
        ([_link("hard", "/etc/passwd", sym=False)], "link"),
    ],
)
def test_crafted_archives_are_refused_without_writing_outside(tmp_path, members, words):
    arc = _crafted(tmp_path / "evil.tar.gz", members)
    dest = tmp_path / "work" / "dest"
    (tmp_path / "work").mkdir()
    with pytest.raises(BadInput, match=words):
        extract(arc, dest)
    assert not dest.exists()
    assert list((tmp_path / "work").iterdir()) == []  # no temp folder left either
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "work" / "escaped.txt").exists()
    assert not Path("/tmp/edgetune-abs-escape.txt").exists()


def test_device_files_and_oversized_members_are_refused(tmp_path):
    dev = tarfile.TarInfo("null")
    dev.type = tarfile.CHRTYPE
    dev.devmajor, dev.devminor = 1, 3
    with pytest.raises(BadInput, match="special"):
        extract(_crafted(tmp_path / "dev.tar.gz", [(dev, None)]), tmp_path / "d1")
    big = _crafted(tmp_path / "big.tar.gz", [_file("big.bin", b"x" * 4096)])
    with pytest.raises(BadInput, match="limit"):
        extract(big, tmp_path / "d2", max_member=1024)
    with pytest.raises(BadInput, match="limit"):
        extract(_crafted(tmp_path / "tot.tar.gz", [_file("a", b"x" * 800), _file("b", b"x" * 800)]), tmp_path / "d3", max_total=1000)
    assert not any((tmp_path / d).exists() for d in ("d1", "d2", "d3"))


def test_truncated_archive_is_bad_input(tmp_path):
    src = _tree(tmp_path / "bundle")
    (src / "sub" / "big.bin").write_bytes(os.urandom(200_000))
    arc = pack(src, tmp_path / "x.tar.gz")
    data = arc.read_bytes()
    arc.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput):
        extract(arc, tmp_path / "un")
    assert not (tmp_path / "un").exists()
