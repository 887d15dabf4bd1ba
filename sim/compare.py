"""Gossip vs its references on the same data and optimizer-step budget."""

from __future__ import annotations

import json
from pathlib import Path

from flower_p2p.config import ExperimentConfig
from flower_p2p.results import (
    RUN_MARKER,
    TABLE_OUTPUTS,
    earlier_outputs,
    prepare_out_dir,
    resolve_out_dir,
    run_outputs,
    write_json,
)
from sim.plots import plot_folder
from sim.runs import network_bytes_per_node
from sim.table import write_md_and_csv
from strategies import strategy_names

REFERENCES = ("local", "centralized")
# What a compare writes next to its run folders (`sim table`/`sim plot` may add the rest).
COMPARE_FILES = ("compare.md", "compare.csv", *TABLE_OUTPUTS)


def compare(cfg: ExperimentConfig, verbose: bool = False) -> Path:
    """Run ``cfg.strategy`` and the references into one folder; write compare.{md,csv}.

    Then every plot: each run's own (centralized as their reference line) and, in ``plots/``,
    the strategies side by side (``compare-strategy.png``).
    """
    from flower_p2p.server_app import preflight
    from sim.engine import run_experiment

    out = resolve_out_dir(cfg.out_dir, f"compare-{cfg.strategy}")
    names = [cfg.strategy, *(r for r in REFERENCES if r != cfg.strategy)]
    # the references run in rounds (mode=async is for gossip: nothing to wait for without it)
    configs = {n: cfg.replace(strategy=n, out_dir=str(out / n), overwrite=True,
                              mode="sync" if n in REFERENCES else cfg.mode)
               for n in names}  # fmt: skip
    for one in configs.values():  # every run's data and model, before the folder is cleared
        preflight(one)
    prepare_out_dir(out, cfg.overwrite, compare_outputs)
    runs = {name: run_experiment(one, verbose=verbose) for name, one in configs.items()}
    summaries = {n: json.loads((d / "summary.json").read_text()) for n, d in runs.items()}
    reference = {n: summaries[n]["accuracy_mean"] for n in REFERENCES if n in summaries}
    for name, run_dir in runs.items():
        summaries[name]["reference"] = {k: v for k, v in reference.items() if k != name}
        write_json(run_dir / "summary.json", summaries[name])
    write_table(out, summaries)
    plot_folder(out)
    return out


def compare_outputs(folder: Path) -> list[Path]:
    """What an earlier compare wrote in ``folder``: its tables, plots and one run per strategy.

    Refuses (nothing deleted) a folder holding anything else, or a run folder that does.
    """
    names = strategy_names()
    for name in names:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            run_outputs(folder / name)
    known = {*COMPARE_FILES, *names}
    markers = ("compare.md", *(f"{n}/{RUN_MARKER}" for n in names))
    return earlier_outputs(folder, known, markers, "compare")


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
