"""Plots from a saved results folder (never re-runs anything)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs inside simulation workers and CI

import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402

from flower_p2p.results import read_jsonl  # noqa: E402


def accuracy_table(metrics: list[dict]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Rounds, an accuracy matrix (rounds x nodes, NaN where not evaluated) and node ids."""
    rounds = sorted({m["round"] for m in metrics})
    nodes = sorted({m["node"] for m in metrics})
    acc = np.full((len(rounds), len(nodes)), np.nan)
    r_idx = {r: i for i, r in enumerate(rounds)}
    n_idx = {n: i for i, n in enumerate(nodes)}
    for m in metrics:
        if m.get("accuracy") is not None:
            acc[r_idx[m["round"]], n_idx[m["node"]]] = m["accuracy"]
    return np.asarray(rounds), acc, nodes


def plot_convergence(run_dir: Path, reference: dict[str, float] | None = None) -> Path:
    """convergence.png: mean node accuracy per round, min-max band, thin per-node lines."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    rounds, acc, nodes = accuracy_table(metrics)
    keep = ~np.isnan(acc).all(axis=1)
    rounds, acc = rounds[keep], acc[keep] * 100
    config = json.loads((run_dir / "config.json").read_text())["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j in range(acc.shape[1]):
        ax.plot(rounds, acc[:, j], color="tab:blue", alpha=0.25, lw=0.8)
    ax.fill_between(rounds, acc.min(axis=1), acc.max(axis=1), color="tab:blue", alpha=0.15,
                    label="min-max over nodes")  # fmt: skip
    ax.plot(rounds, acc.mean(axis=1), color="tab:blue", lw=2.2,
            label=f"{config['strategy']}: mean of {len(nodes)} node(s)")  # fmt: skip
    styles = {"centralized": ("black", "--"), "local": ("tab:red", ":")}
    for name, value in (reference or {}).items():
        color, ls = styles.get(name, ("gray", "-."))
        ax.axhline(100 * value, color=color, ls=ls, lw=1.5, label=f"{name} reference (final)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(
        f"{config['dataset']}, {config['partitioner']}"
        + (f" (alpha={config['alpha']})" if config["partitioner"] == "dirichlet" else "")
        + f", {config['topology']}, {config['model']}",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = run_dir / "convergence.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SCHEDULES_DRAWN_ON_A_CIRCLE = ("directed-exponential", "one-peer-exponential", "random-matching")


def plot_topology(run_dir: Path) -> Path | None:
    """topology.png: the communication graph, nodes coloured by final accuracy."""
    from flower_p2p.config import ExperimentConfig
    from flower_p2p.schedules import is_schedule, period_spectral_gap, topology_at

    cfg = ExperimentConfig.from_run_config(
        json.loads((run_dir / "config.json").read_text())["config"]
    )
    if cfg.num_nodes < 2 or cfg.strategy == "centralized":
        return None  # one model, no graph
    topo = topology_at(cfg, 1)
    rounds, acc, nodes = accuracy_table(read_jsonl(run_dir / "metrics.jsonl"))
    final = acc[~np.isnan(acc).all(axis=1)][-1] if len(nodes) == cfg.num_nodes else None
    fig, ax = plt.subplots(figsize=(5, 5))
    circular = ("ring", "exponential", *SCHEDULES_DRAWN_ON_A_CIRCLE)
    pos = nx.circular_layout(topo.graph) if cfg.topology in circular else (
        nx.spring_layout(topo.graph, seed=cfg.seed))  # fmt: skip
    colors = 100 * final if final is not None else "tab:blue"
    drawn = nx.draw_networkx_nodes(topo.graph, pos, ax=ax, node_color=colors, cmap="viridis",
                                   vmin=0, vmax=100, node_size=420)  # fmt: skip
    nx.draw_networkx_edges(topo.graph, pos, ax=ax, alpha=0.5, node_size=420)
    nx.draw_networkx_labels(topo.graph, pos, ax=ax, font_size=8, font_color="white")
    if final is not None:
        fig.colorbar(drawn, ax=ax, shrink=0.7, label="final test accuracy (%)")
    gap = period_spectral_gap(cfg)
    title = f"{cfg.topology}" + (" (round 1)" if is_schedule(cfg.topology) else f", {cfg.mixing}")
    title += f", spectral gap {gap:.3f}" if gap is not None else ""
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    path = run_dir / "topology.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(run_dir: Path | str) -> list[Path]:
    """Every plot of one run folder; the reference line comes from summary.json when present."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    paths = [plot_convergence(run_dir, summary.get("reference"))]
    topo = plot_topology(run_dir)
    return paths + ([topo] if topo else [])
