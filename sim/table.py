"""Tables and accuracy-vs-communication plots over many finished runs (no re-running)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flower_p2p.results import atomic_write_text, read_jsonl  # noqa: E402


def collect_runs(folder: Path) -> list[dict]:
    """Every finished run below ``folder``: its config, summary and metrics."""
    runs = []
    for summary_path in sorted(folder.rglob("summary.json")):
        run_dir = summary_path.parent
        runs.append(
            {
                "dir": run_dir,
                "config": json.loads((run_dir / "config.json").read_text())["config"],
                "summary": json.loads(summary_path.read_text()),
                "metrics": read_jsonl(run_dir / "metrics.jsonl"),
            }
        )
    return runs


def write_table(folder: Path, by: tuple[str, ...]) -> str:
    """table.md / table.csv: final mean and worst node accuracy and MB per node, one row a run."""
    runs = sorted(collect_runs(folder), key=lambda r: tuple(str(r["config"][k]) for k in by))
    header = [*by, "mean acc (%)", "worst node (%)", "MB sent per node", "wall (s)"]
    rows = [
        [*(str(r["config"][k]) for k in by),
         f"{100 * r['summary']['accuracy_mean']:.2f}", f"{100 * r['summary']['accuracy_min']:.2f}",
         f"{r['summary']['mean_bytes_sent_per_node'] / 1e6:.1f}", f"{r['summary']['wall_s']:.0f}"]
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


def mean_accuracy_vs_mb(metrics: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per evaluated round: mean node accuracy (%) against mean MB sent per node so far."""
    rounds = sorted({m["round"] for m in metrics if m["accuracy"] is not None})
    acc = [100 * np.mean([m["accuracy"] for m in metrics if m["round"] == t and
                          m["accuracy"] is not None]) for t in rounds]  # fmt: skip
    mb = [np.mean([m["bytes_sent"] for m in metrics if m["round"] == t]) / 1e6 for t in rounds]
    return np.asarray(mb), np.asarray(acc)


def plot_accuracy_vs_mb(folder: Path, line: str, panel: str) -> Path:
    """accuracy_vs_mb.png: one panel per value of ``panel``, one curve per value of ``line``."""
    runs = collect_runs(folder)
    panels = sorted({str(r["config"][panel]) for r in runs})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False,
                             sharey=True)  # fmt: skip
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = sorted({str(r["config"][line]) for r in runs})
    for ax, value in zip(axes[0], panels, strict=True):
        for r in runs:
            if str(r["config"][panel]) != value:
                continue
            mb, acc = mean_accuracy_vs_mb(r["metrics"])
            name = str(r["config"][line])
            ax.plot(np.maximum(mb, 1e-3), acc, color=colors[lines.index(name) % len(colors)],
                    lw=1.8, label=name)  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(f"{panel} = {value}", fontsize=10)
        ax.set_xlabel("MB sent per node (log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("mean node test accuracy (%)")
    axes[0][0].set_ylim(0, 100)
    fig.tight_layout()
    path = folder / "accuracy_vs_mb.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
