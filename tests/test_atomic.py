"""Output files: replaced whole or not at all; links are followed; devices are written in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from isa.atomic import atomic_file
from isa.diag import CimcError


def test_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(out, "w") as f:
        f.write("half")
        raise RuntimeError("boom")
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
    with atomic_file(out, "w") as f:
        f.write("new")
    assert out.read_text() == "new" and os.listdir(tmp_path) == ["r.json"]


def test_follows_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with atomic_file(link, "w") as f:
        f.write("new")
    assert link.is_symlink() and target.read_text() == "new"


def test_writes_devices_in_place(tmp_path: Path) -> None:
    with atomic_file("/dev/null", "w") as f:
        f.write("discarded")
    assert Path("/dev/null").is_char_device()
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    with atomic_file(fifo, "w") as f:
        f.write("through the pipe")
    assert os.read(reader, 100) == b"through the pipe"
    os.close(reader)
    assert fifo.is_fifo()


def test_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(CimcError, match=r"^cannot write .*/nodir/x: No such file or directory$"), \
            atomic_file(tmp_path / "nodir" / "x", "w"):
        pass
