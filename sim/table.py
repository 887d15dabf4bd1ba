"""Tables and accuracy-vs-communication plots over many finished runs (no re-running)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from flower_p2p.results import atomic_write_text
from sim.plots import comparison_figure, save
from sim.runs import collect_runs, network_bytes_per_node


def write_table(folder: Path, by: tuple[str, ...]) -> str:
    """table.md / table.csv: final mean and worst node accuracy and MB per node, one row a run.

    MB per node is the node's share of all traffic on the network (``network.Traffic``: what it
    sent, plus a server's broadcast to it for the fedavg reference).
    """
    runs = sorted(collect_runs(folder), key=lambda r: tuple(str(r.config[k]) for k in by))
    header = [*by, "mean acc (%)", "worst node (%)", "MB on the network per node", "wall (s)"]
    rows = [
        [*(str(r.config[k]) for k in by),
         f"{100 * r.summary['accuracy_mean']:.2f}", f"{100 * r.summary['accuracy_min']:.2f}",
         f"{network_bytes_per_node(r.summary, r.config['strategy']) / 1e6:.1f}",
         f"{r.summary['wall_s']:.0f}"]
        for r in runs
    ]  # fmt: skip
    return write_md_and_csv(folder, "table", header, rows)


def write_md_and_csv(folder: Path, stem: str, header: list[str], rows: list[list[str]]) -> str:
    """``<stem>.md`` (a Markdown table) and ``<stem>.csv`` with the same cells; returns the md."""
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    atomic_write_text(folder / f"{stem}.md", md)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write_text(folder / f"{stem}.csv", buf.getvalue())
    return md


def plot_accuracy_vs_mb(folder: Path, line: str, panel: str) -> Path:
    """accuracy_vs_mb.png: one panel per value of ``panel``, one curve per value of ``line``."""
    fig = comparison_figure(collect_runs(folder), line, (panel,), xs=("mb",))
    return save(fig, folder / "accuracy_vs_mb.png")
