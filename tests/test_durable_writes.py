"""Every rename into place is followed by an fsync of the folder, so a crash cannot undo it."""

import os
import stat
from pathlib import Path

import pytest
import torch

from flower_p2p.results import atomic_write_bytes
from sim.pretrain import _save_atomic


@pytest.fixture
def events(monkeypatch):
    """Replaces and fsyncs in order: ("replace", dst), ("fsync-dir" or "fsync-file", inode)."""
    seen: list[tuple[str, object]] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        seen.append(("replace", Path(dst)))

    def fsync(fd):
        info = os.fstat(fd)
        kind = "fsync-dir" if stat.S_ISDIR(info.st_mode) else "fsync-file"
        seen.append((kind, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _durable(seen: list, path: Path) -> bool:
    """The file's bytes were fsynced before the rename, its folder after it."""
    i = seen.index(("replace", path))  # a rename keeps the inode of the temporary file
    file_first = ("fsync-file", path.stat().st_ino) in seen[:i]
    return file_first and ("fsync-dir", path.parent.stat().st_ino) in seen[i + 1 :]


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, events):
    path = tmp_path / "sub" / "summary.json"
    atomic_write_bytes(path, b"{}\n")
    assert path.read_bytes() == b"{}\n"
    assert _durable(events, path)
    # the new folder's own name is made durable too, before the file goes in
    assert ("fsync-dir", tmp_path.stat().st_ino) in events[: events.index(("replace", path))]


def test_pretrain_checkpoint_fsyncs_the_folder_after_the_rename(tmp_path, events):
    path = tmp_path / "ckpt.safetensors"
    _save_atomic(torch.nn.Linear(2, 2), path)
    assert path.stat().st_size > 0
    assert _durable(events, path)
