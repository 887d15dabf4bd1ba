"""Saved results folders: load runs, group them by config, and find their centralized reference.

A *run folder* holds config.json, metrics.jsonl, network.jsonl and, once finished, summary.json
(written last). A *collection* is a folder of run folders: ``python -m sim compare`` writes one
(marked by compare.md), ``python -m sim sweep`` another (marked by sweep.json).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flower_p2p.config import ExperimentConfig
from flower_p2p.results import read_jsonl

# Keys that change nothing in the centralized reference's training: it has no graph and never
# communicates, so one centralized run serves every value of these.
NOT_REFERENCE_KEYS = (
    "strategy", "gamma", "compressor", "compress-fraction", "topology", "mixing", "edge-prob",
    "degree", "small-world-k", "small-world-p", "share",
    "placement",  # the centralized reference trains on the partitions in their own order
    # the clock: one model has no peers to wait for (its reference runs mode=sync)
    "mode", "step-time", "slow-fraction", "slowdown", "speed-spread", "latency", "latency-spread",
)  # fmt: skip
# Where a run is written and what it was allowed to use, not what it computes.
LOCATION_KEYS = ("out-dir", "overwrite", "memory-limit-gb")
COLLECTION_MARKERS = ("sweep.json", "compare.md")


@dataclass
class Run:
    """One saved run: its folder and the files in it (summary empty while unfinished)."""

    dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    network: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        """Whether this is a centralized run (a reference line, not a curve to compare)."""
        return self.config["strategy"] == "centralized"


def load_run(run_dir: Path) -> Run:
    """Read a run folder (finished or not)."""
    run_dir = Path(run_dir)
    network, summary = run_dir / "network.jsonl", run_dir / "summary.json"
    # a key added since the run was made did not exist then: it ran with the key's default, and
    # must match runs made since (a reference of an older run was otherwise never found)
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    return Run(
        dir=run_dir,
        config={**ExperimentConfig().to_run_config(), **saved},
        metrics=read_jsonl(run_dir / "metrics.jsonl"),
        network=read_jsonl(network) if network.exists() else [],
        summary=json.loads(summary.read_text()) if summary.exists() else {},
    )


def _older_fedavg(where: object) -> ValueError:
    return ValueError(
        f"{where}: a fedavg run recorded before the server's broadcast was counted (no "
        "network_bytes); its figure would be half the real cost: run it again"
    )


def network_bytes_key(run: Run) -> str:
    """The metrics key of a node's share of the network's traffic (``network.Traffic``).

    Runs written before ``network_bytes`` existed counted only what nodes sent: the same figure
    for peer-to-peer strategies, but half the real cost for fedavg (no server broadcast), so
    such a fedavg run is refused rather than shown at half its cost.
    """
    if run.metrics and "network_bytes" in run.metrics[0]:
        return "network_bytes"
    if run.config.get("strategy") == "fedavg":
        raise _older_fedavg(run.dir)
    return "bytes_sent"


def network_bytes_per_node(summary: dict[str, Any], strategy: str | None = None) -> float:
    """Mean bytes per node on the network over a whole run, from its summary.json (see above).

    ``strategy`` defaults to the one summary.json names.
    """
    if "network_bytes_per_node" in summary:
        return float(summary["network_bytes_per_node"])
    if (strategy or summary.get("strategy")) == "fedavg":
        raise _older_fedavg("summary.json")
    return float(summary["mean_bytes_sent_per_node"])


def collect_runs(folder: Path) -> list[Run]:
    """Every finished run below ``folder`` (a summary.json marks a finished run), by path."""
    return [load_run(p.parent) for p in sorted(Path(folder).rglob("summary.json"))]


def config_key(config: dict[str, Any], ignore: tuple[str, ...] = ()) -> tuple:
    """A hashable identity of a config, leaving out ``ignore`` and where the run was written."""
    skip = set(ignore) | set(LOCATION_KEYS)
    return tuple(sorted((k, json.dumps(v)) for k, v in config.items() if k not in skip))


def group_seeds(runs: list[Run]) -> dict[tuple, list[Run]]:
    """Runs that differ only by seed, together (groups in first-seen order)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(config_key(run.config, ("seed",)), []).append(run)
    return groups


def matching_references(
    config: dict[str, Any], pool: list[Run], seeds: set[int] | None = None
) -> list[Run]:
    """The centralized runs of ``pool`` that serve as ``config``'s reference.

    They agree with ``config`` on every key that matters to centralized training, and their seed
    is one of ``seeds`` (default: ``config``'s own seed).
    """
    seeds = {config["seed"]} if seeds is None else seeds
    ignore = (*NOT_REFERENCE_KEYS, "seed")
    want = config_key(config, ignore)
    return [
        r
        for r in pool
        if r.is_reference and r.config["seed"] in seeds and config_key(r.config, ignore) == want
    ]


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between ``runs`` (seed and location left out)."""
    keys = [k for k in runs[0].config if k not in (*LOCATION_KEYS, "seed")] if runs else []
    return [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def collection_of(run_dir: Path) -> Path | None:
    """The compare or sweep folder ``run_dir`` belongs to, if any."""
    for parent in Path(run_dir).resolve().parents[:2]:
        if any((parent / m).exists() for m in COLLECTION_MARKERS):
            return parent
    return None


def run_name(values: dict[str, Any]) -> str:
    """A stable, filesystem-safe name ``key=value,key=value`` (other characters become ``_``)."""
    parts = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "default"
