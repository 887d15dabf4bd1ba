"""The results folder: config.json, metrics.jsonl, network.jsonl, summary.json, final/.

``final/node-<i>.safetensors`` holds node i's final trainable parameters.

Every file is written to a temporary name, fsynced and renamed into place, then its folder is
fsynced (``replace_durably``), so a reader (or a crash) never sees a half-written file and a
crash cannot undo a rename.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from flower_p2p.registry import ConfigError

PACKAGES = ("flwr", "flwr-datasets", "torch", "timm", "datasets", "numpy", "networkx")
# Subfolder where every node saves its final trainable parameters (read back by `sim plot`).
FINAL_DIR = "final"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same folder and a rename."""
    make_dirs_durably(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` (already fsynced) to ``path``, then fsync the folder.

    The rename lives in the folder's entries: until they reach the disk, a crash can bring back
    the old file, or no file at all.
    """
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_dirs_durably(folder: Path) -> None:
    """``mkdir -p folder``, fsyncing the parent of each folder it creates (as for a rename)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)  # another writer (a node of the same round) may win the race
        fsync_dir(new.parent)


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (names created, renamed or deleted in it) to disk."""
    if os.name == "nt":  # Windows cannot open a folder; NTFS journals its renames itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomically (re)write a JSON-lines file."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_params(path: Path, params: dict[str, np.ndarray]) -> None:
    """Atomically write named arrays as a safetensors file."""
    from safetensors.numpy import save

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in params.items()}))


def node_params_path(final_dir: Path, node: int) -> Path:
    """Where node ``node`` saves its final trainable parameters inside ``final_dir``."""
    return Path(final_dir) / f"node-{node}.safetensors"


def read_params(path: Path) -> dict[str, np.ndarray]:
    """Named arrays of a safetensors file written by ``write_params``."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def resolve_out_dir(out_dir: str, strategy: str) -> Path:
    """``out-dir`` as given, or a new timestamped folder under ``runs/``."""
    if out_dir:
        return Path(out_dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return (Path("runs") / f"{stamp}-{strategy}").resolve()


def prepare_out_dir(path: Path, overwrite: bool) -> None:
    """Refuse to write into a folder holding results unless ``overwrite`` is set."""
    if path.exists() and not path.is_dir():
        raise ConfigError("out-dir", str(path), "a folder path (this is a file)")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            "out-dir", str(path), "a new or empty folder, or overwrite=true to replace its results"
        )
    path.mkdir(parents=True, exist_ok=True)
