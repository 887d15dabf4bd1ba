"""Checkpoints of a run, and resuming from the last complete one.

Layout under ``<out-dir>/checkpoints/``::

    round-000012/node-3.npz     one node's state after round 12, written by that node
    round-000012/relay.json     the relay's state: metrics so far, bytes sent, fault counts
    round-000012/relay-out.npz  the messages sent in round 12, still to be delivered
    latest.json                 {"round": 12, "dir": "round-000012", "config": {...}}

In ``mode=async`` (``async_relay``) round 12 is the 12th record time, ``relay-out.npz`` holds
sender j's message number k as ``<j>><k>/<name>`` (every message a later activation combines),
and ``relay-monitors.npz`` the models already evaluated for records still open.

Every file is written to a temporary name and renamed. ``latest.json`` is written last and is the
commit point: a checkpoint folder it does not name may be incomplete and is never read. Older
folders are deleted once the manifest has moved on. Random generators need no saving: training
batches, compression draws, random matchings and faults all come from generators seeded by
(seed, node, round) or (seed, round).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flower_p2p.registry import ConfigError
from flower_p2p.results import (
    CHECKPOINTS_DIR,
    RUN_MARKER,
    atomic_write_bytes,
    check_out_dir,
    prepare_out_dir,
    write_json,
)

CHECKPOINTS = CHECKPOINTS_DIR
MANIFEST = "latest.json"
# Keys that may differ between the interrupted and the resumed run.
# nodes-per-supernode changes how messages travel, not what any node computes (tested).
RESUME_MAY_CHANGE = (
    "resume",
    "overwrite",
    "checkpoint-every",
    "out-dir",
    "memory-limit-gb",
    "nodes-per-supernode",
)

Arrays = dict[str, np.ndarray]


def round_dir(out: Path, rnd: int) -> Path:
    """The folder of the checkpoint taken after round ``rnd``."""
    return out / CHECKPOINTS / f"round-{rnd:06d}"


def node_file(folder: Path, node: int) -> Path:
    """Where node ``node`` writes its state inside a checkpoint folder."""
    return folder / f"node-{node}.npz"


def write_npz(path: Path, arrays: Arrays) -> None:
    """Atomically write named arrays (``results.atomic_write_bytes``: temporary file, rename)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_npz(path: Path) -> Arrays:
    """Named arrays written by ``write_npz``."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _nest(groups: dict[str, Arrays | None]) -> Arrays:
    return {f"{g}/{k}": v for g, arrays in groups.items() if arrays for k, v in arrays.items()}


def _unnest(flat: Arrays, group: str) -> Arrays | None:
    prefix = f"{group}/"
    out = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    return out or None


def write_node_state(
    path: Path, params: Arrays | None, algo: Arrays | None, optimizer: Arrays | None
) -> None:
    """One node's state: parameters, algorithm and optimizer state (None: not yet created)."""
    parts = {"params": params, "algo": algo, "optim": optimizer}
    flat = _nest(parts)
    # A node that has never trained (dropped every round so far) writes markers only; a
    # strategy without state (DSGD) writes an empty group.
    for group, arrays in parts.items():
        flat[f"has/{group}"] = np.array(arrays is not None)
    write_npz(path, flat)


def read_node_state(path: Path) -> tuple[Arrays | None, Arrays | None, Arrays | None]:
    """Inverse of ``write_node_state``."""
    flat = read_npz(path)
    groups = [
        (_unnest(flat, g) or {}) if bool(flat.get(f"has/{g}", False)) else None
        for g in ("params", "algo", "optim")
    ]
    return groups[0], groups[1], groups[2]


def write_relay_state(folder: Path, state: dict, last_out: dict[int, dict]) -> None:
    """The relay's own state and the messages it still has to deliver.

    ``last_out[j]`` is j's message (arrays), or ``{receiver: arrays}`` when j sent each receiver
    its own (stored as ``<j>><receiver>/<name>``).
    """
    flat = {}
    for j, message in last_out.items():
        for key, value in message.items():
            if isinstance(key, int):
                flat.update({f"{j}>{key}/{k}": v for k, v in value.items()})
            else:
                flat[f"{j}/{key}"] = value
    write_npz(folder / "relay-out.npz", flat)
    write_json(folder / "relay.json", state)


def commit(out: Path, rnd: int, run_config: dict) -> None:
    """Make round ``rnd``'s checkpoint the one to resume from, then delete the others."""
    folder = round_dir(out, rnd)
    write_json(
        out / CHECKPOINTS / MANIFEST, {"round": rnd, "dir": folder.name, "config": run_config}
    )
    for old in (out / CHECKPOINTS).glob("round-*"):
        if old != folder and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class Checkpoint:
    """A committed checkpoint, as read back."""

    round: int
    folder: Path
    relay: dict
    last_out: dict[int, dict]


def _comparable(run_config: dict) -> dict:
    return {k: v for k, v in run_config.items() if k not in RESUME_MAY_CHANGE}


def load_latest(out: Path, run_config: dict) -> Checkpoint:
    """The last committed checkpoint of ``out``; refused if missing or from another config."""
    manifest = out / CHECKPOINTS / MANIFEST
    if not manifest.is_file():
        raise ConfigError("resume", True, f"an out-dir holding a checkpoint; {_no_checkpoint(out)}")
    meta = json.loads(manifest.read_text())
    from flower_p2p.config import ExperimentConfig

    # a key added since the checkpoint was written did not exist then: it ran with its default
    saved = _comparable({**ExperimentConfig().to_run_config(), **meta["config"]})
    now = _comparable(run_config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(
            "resume", True, f"the checkpointed run's config; these keys differ: {diff}"
        )
    folder = out / CHECKPOINTS / meta["dir"]
    relay = json.loads((folder / "relay.json").read_text())
    last_out: dict[int, dict] = {}
    for key, value in read_npz(folder / "relay-out.npz").items():
        sender, name = key.split("/", 1)
        if ">" in sender:  # a per-receiver message
            sender, receiver = sender.split(">")
            last_out.setdefault(int(sender), {}).setdefault(int(receiver), {})[name] = value
        else:
            last_out.setdefault(int(sender), {})[name] = value
    return Checkpoint(round=int(meta["round"]), folder=folder, relay=relay, last_out=last_out)


def _no_checkpoint(out: Path) -> str:
    """Why ``out`` has no checkpoint to resume from, and what to type instead."""
    again = f"run it again without resume: overwrite=true resume=false out-dir={out}"
    try:
        started = json.loads((out / RUN_MARKER).read_text())["config"]
        every = int(started["checkpoint-every"])
    except (OSError, ValueError, KeyError, TypeError):
        return (
            f"{out} has no config.json, so it is not a run's results folder (no run was "
            "started there); start the run without resume=true"
        )
    if every == 0:
        return (
            f"the run in {out} was started with checkpoint-every=0 (per its config.json), so it "
            f"never checkpointed; {again} (add checkpoint-every=k to be able to resume it)"
        )
    if (out / "summary.json").is_file():
        return (
            f"the run in {out} was started with checkpoint-every={every} (per its config.json) "
            f"and finished (summary.json) before round {every}, so it has no checkpoint; "
            f"there is nothing to resume"
        )
    return (
        f"the run in {out} was started with checkpoint-every={every} (per its config.json) but "
        f"has no complete checkpoint: it stopped before round {every} finished; {again}"
    )


def open_out_dir(
    out: Path, run_config: dict, resume: bool, overwrite: bool, check_only: bool = False
) -> Checkpoint | None:
    """Prepare ``out`` for a fresh run, or load the checkpoint to resume.

    A fresh run with ``overwrite`` deletes the previous run's results (``prepare_out_dir``).
    Both happen before any training, so bad input leaves the folder as it was. ``check_only``:
    refuse what would be refused, but change nothing (``sim.engine`` checks before Ray starts;
    the ServerApp, which writes the run, deletes).
    """
    if not resume:
        if check_only:
            check_out_dir(out, overwrite)
        else:
            prepare_out_dir(out, overwrite)
        return None
    if not out.is_dir():
        raise ConfigError(
            "out-dir", str(out), "the folder of the run to resume (it does not exist)"
        )
    return load_latest(out, run_config)


def remove_temp_files(out: Path) -> None:
    """Delete temporary files that a killed run left behind (``.<name>.<random>``)."""
    for folder in (out, *(p for p in (out / CHECKPOINTS).rglob("*") if p.is_dir())):
        for tmp in folder.glob(".*.*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
