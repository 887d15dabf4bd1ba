"""Gossip vs its references on the same data and optimizer-step budget."""

from __future__ import annotations

import json
from pathlib import Path

from flower_p2p.config import ExperimentConfig
from flower_p2p.results import prepare_out_dir, resolve_out_dir, write_json
from sim.plots import plot_folder
from sim.runs import network_bytes_per_node
from sim.table import write_md_and_csv

REFERENCES = ("local", "centralized")


def compare(cfg: ExperimentConfig, verbose: bool = False) -> Path:
    """Run ``cfg.strategy`` and the references into one folder; write compare.{md,csv}.

    Then every plot: each run's own (centralized as their reference line) and, in ``plots/``,
    the strategies side by side (``compare-strategy.png``).
    """
    from sim.engine import run_experiment

    out = resolve_out_dir(cfg.out_dir, f"compare-{cfg.strategy}")
    prepare_out_dir(out, cfg.overwrite)
    names = [cfg.strategy, *(r for r in REFERENCES if r != cfg.strategy)]
    runs = {}
    for name in names:
        runs[name] = run_experiment(
            cfg.replace(strategy=name, out_dir=str(out / name), overwrite=True), verbose=verbose
        )
    summaries = {n: json.loads((d / "summary.json").read_text()) for n, d in runs.items()}
    reference = {n: summaries[n]["accuracy_mean"] for n in REFERENCES if n in summaries}
    for name, run_dir in runs.items():
        summaries[name]["reference"] = {k: v for k, v in reference.items() if k != name}
        write_json(run_dir / "summary.json", summaries[name])
    write_table(out, summaries)
    plot_folder(out)
    return out


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def write_table(out: Path, summaries: dict[str, dict]) -> None:
    """compare.md and compare.csv: final mean / worst node accuracy, MB per node, time.

    When some node lacked classes, also the accuracy on those unseen classes (mean and worst
    node; "–" for a run whose nodes saw every class, e.g. the centralized reference).
    """
    unseen = any(s.get("unseen_accuracy_mean") is not None for s in summaries.values())
    header = ["strategy", "mean acc (%)", "worst node acc (%)"]
    if unseen:
        header += ["mean unseen-class acc (%)", "worst node unseen-class acc (%)"]
    header += ["MB on the network per node", "wall (s)"]
    rows = []
    for name, s in summaries.items():
        row = [name, _pct(s["accuracy_mean"]), _pct(s["accuracy_min"])]
        if unseen:
            row += [_pct(s.get("unseen_accuracy_mean")), _pct(s.get("unseen_accuracy_min"))]
        rows.append([*row, f"{network_bytes_per_node(s) / 1e6:.2f}", f"{s['wall_s']:.0f}"])
    write_md_and_csv(out, "compare", header, rows)
