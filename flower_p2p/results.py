"""The results folder: config.json, metrics.jsonl, network.jsonl, summary.json, final/.

``final/node-<i>.safetensors`` holds node i's final trainable parameters.

Every file is written to a temporary name, fsynced and renamed into place, then its folder is
fsynced (``replace_durably``), so a reader (or a crash) never sees a half-written file and a
crash cannot undo a rename. ``overwrite=true`` deletes exactly what a previous run wrote
(``RUN_OUTPUTS``), and refuses a folder holding anything else (``prepare_out_dir``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Collection
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from flower_p2p.registry import ConfigError

PACKAGES = ("flwr", "flwr-datasets", "torch", "timm", "datasets", "numpy", "networkx")
# Subfolder where every node saves its final trainable parameters (read back by `sim plot`).
FINAL_DIR = "final"
# Written first by every run: what marks a folder as a run's results folder.
RUN_MARKER = "config.json"
CHECKPOINTS_DIR = "checkpoints"
# The figures `sim.plots.plot_run` draws into a run folder.
RUN_PLOTS = ("convergence.png", "topology.png", "consensus.png", "labels.png", "attention.png")
# What `sim table` and `sim plot` may add to any folder they read runs from.
TABLE_OUTPUTS = ("table.md", "table.csv", "accuracy_vs_mb.png", "plots")
# Everything a run (and the tools reading it) writes at the top of its folder: overwrite=true
# deletes exactly these, plus their temporary files (``.<name>.<random>``), and nothing else.
RUN_OUTPUTS = frozenset(
    {RUN_MARKER, "metrics.jsonl", "network.jsonl", "summary.json", FINAL_DIR, CHECKPOINTS_DIR,
     *RUN_PLOTS, *TABLE_OUTPUTS}
)  # fmt: skip


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
    """Records of a JSON-lines file; a last line without its newline (a torn append) is not one."""
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]


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


def check_out_dir(
    path: Path, overwrite: bool, outputs: Callable[[Path], list[Path]] | None = None
) -> list[Path]:
    """Refuse an unusable ``out-dir``; return what ``overwrite`` will delete (nothing is touched).

    A non-empty folder needs ``overwrite``, and even then must hold only what an earlier run
    wrote (``outputs``, default ``run_outputs``): ``out-dir=~ overwrite=true`` deletes nothing.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError("out-dir", str(path), "a folder path (this is a file)")
    if not path.is_dir() or not any(path.iterdir()):
        return []
    if not overwrite:
        raise ConfigError(
            "out-dir", str(path), "a new or empty folder, or overwrite=true to replace its results"
        )
    return (outputs or run_outputs)(path)


def prepare_out_dir(
    path: Path, overwrite: bool, outputs: Callable[[Path], list[Path]] | None = None
) -> None:
    """``check_out_dir``, then delete the previous results it found and create the folder.

    Call it only once every other check has passed: bad input never deletes anything.
    """
    for stale in check_out_dir(path, overwrite, outputs):
        remove_path(stale)
    make_dirs_durably(path)


def run_outputs(folder: Path) -> list[Path]:
    """The entries of ``folder`` that a previous run wrote, its ``config.json`` last.

    Refused (ConfigError, nothing deleted) when the folder holds anything else, or is not a
    run's folder at all (no config.json).
    """
    return earlier_outputs(folder, RUN_OUTPUTS, (RUN_MARKER,), "run")


def earlier_outputs(
    folder: Path, known: Collection[str], markers: Collection[str], what: str
) -> list[Path]:
    """The entries of ``folder``, if every one is in ``known`` (or is a temporary file of one).

    ``markers`` (paths relative to ``folder``): one must exist, unless the folder holds only
    temporary files; the entries they live in come last, so an interrupted deletion can be
    retried. ``what`` names the command in the message ("run", "compare").
    """
    entries = sorted(folder.iterdir())
    foreign = [p for p in entries if p.name not in known and not _is_temp_of(p.name, known)]
    allowed = f"a new or empty folder, or a previous {what}'s results folder to overwrite"
    if foreign:
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ConfigError(
            "out-dir", str(folder), f"{allowed}; this one also holds {shown}{more}, which no "
            f"{what} writes (nothing was deleted; choose another out-dir or move them)",
        )  # fmt: skip
    real = [p for p in entries if p.name in known]
    if real and not any((folder / m).exists() for m in markers):
        raise ConfigError(
            "out-dir", str(folder), f"{allowed}; this one holds no {' or '.join(markers)}, so "
            f"it is not one (nothing was deleted; choose another out-dir)",
        )  # fmt: skip
    tops = {Path(m).parts[0] for m in markers}
    return sorted(entries, key=lambda p: p.name in tops)


def _is_temp_of(name: str, known: Collection[str]) -> bool:
    # atomic_write_bytes' temporary names: ".<name>.<random, no dots>"
    return name.startswith(".") and name[1:].rpartition(".")[0] in known


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree; a symbolic link is unlinked, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
