"""Plots from saved results folders (never re-runs anything).

Every ``*_figure`` function returns a matplotlib Figure (tests count its axes and lines) and
``save`` writes it as a PNG. ``plot_run`` draws every plot of one run folder, ``plot_folder``
those of a run, compare or sweep folder. Curves are labelled at their ends, not in a legend.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs inside simulation workers and CI

import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
from datasets import Dataset  # noqa: E402
from flwr_datasets.partitioner import Partitioner  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from flower_p2p.config import ExperimentConfig  # noqa: E402
from flower_p2p.registry import ConfigError  # noqa: E402
from flower_p2p.results import atomic_write_bytes  # noqa: E402
from sim.runs import (  # noqa: E402
    Run,
    collect_runs,
    collection_of,
    group_seeds,
    load_run,
    matching_references,
    network_bytes_key,
    run_name,
    varying_keys,
)

MAIN, UNSEEN, REFERENCE = "tab:blue", "tab:orange", "black"
METRIC_LABELS = {"accuracy": "test accuracy", "unseen_accuracy": "accuracy on unseen classes"}
GROUP_ORDER = ("attn", "mlp", "norm", "head", "embed", "other")


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG (atomically, like every results file) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def round_node_table(metrics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Rounds, a (rounds x nodes) matrix of ``key`` (NaN where absent or null) and node ids."""
    rounds = sorted({m["round"] for m in metrics})
    nodes = sorted({m["node"] for m in metrics})
    table = np.full((len(rounds), len(nodes)), np.nan)
    r_idx = {r: i for i, r in enumerate(rounds)}
    n_idx = {n: i for i, n in enumerate(nodes)}
    for m in metrics:
        if m.get(key) is not None:
            table[r_idx[m["round"]], n_idx[m["node"]]] = m[key]
    return np.asarray(rounds), table, nodes


@dataclass
class Curve:
    """One run's evaluated rounds: per-node values (%) and per-node MB on the network so far."""

    rounds: np.ndarray
    values: np.ndarray
    mb: np.ndarray
    time: np.ndarray  # simulated seconds of each evaluated round (NaN: not recorded)


def node_curve(run: Run, key: str = "accuracy") -> Curve | None:
    """``key`` (e.g. accuracy, unseen_accuracy) per evaluated round and node; None if never set."""
    rounds, values, _ = round_node_table(run.metrics, key)
    keep = ~np.isnan(values).all(axis=1)
    if not keep.any():
        return None
    _, traffic, _ = round_node_table(run.metrics, network_bytes_key(run))
    _, times, _ = round_node_table(run.metrics, "sim_time")
    with np.errstate(all="ignore"):
        time = np.nanmax(times[keep], axis=1) if not np.isnan(times[keep]).all() else (
            np.full(keep.sum(), np.nan))  # fmt: skip
    return Curve(rounds[keep], 100 * values[keep], np.nan_to_num(traffic[keep]) / 1e6, time)


@dataclass
class SeedBand:
    """Mean over nodes, then mean and sample std over seeds (std None for one seed)."""

    rounds: np.ndarray
    mb: np.ndarray
    mean: np.ndarray
    std: np.ndarray | None
    seeds: int
    time: np.ndarray  # simulated seconds, mean over seeds


def seed_band(curves: list[Curve]) -> SeedBand:
    """Mean-node curves of several seeds of one config, on their common evaluated rounds."""
    n = min(len(c.rounds) for c in curves)
    node_means = np.stack([np.nanmean(c.values[:n], axis=1) for c in curves])
    return SeedBand(
        rounds=curves[0].rounds[:n],
        mb=np.mean([c.mb[:n].mean(axis=1) for c in curves], axis=0),
        mean=node_means.mean(axis=0),
        std=node_means.std(axis=0, ddof=1) if len(curves) > 1 else None,
        seeds=len(curves),
        time=np.mean([c.time[:n] for c in curves], axis=0),
    )


def describe(config: dict, varying: tuple[str, ...] = ()) -> str:
    """A short title for a run's setting, leaving out the ``varying`` keys."""
    part = config["partitioner"]
    part += f" (alpha={config['alpha']})" if part == "dirichlet" and "alpha" not in varying else ""
    shown = {"dataset": config["dataset"], "partitioner": part, "topology": config["topology"],
             "model": config["model"]}  # fmt: skip
    for key, plain in (("placement", "random"), ("feature-skew", "none")):
        if config.get(key, plain) != plain:
            shown[key] = f"{key}={config[key]}"
    return ", ".join(v for k, v in shown.items() if k not in varying)


def suptitle(fig: Figure, *lines: str) -> None:
    """A figure title, each line wrapped to the figure's width."""
    width = max(40, int(fig.get_figwidth() * 13))
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize=9)


def label_ends(ax: Axes, ends: list[tuple[float, str, str]]) -> None:
    """Write each (y, text, colour) just right of the axes at height y, nudged apart."""
    lo, hi = ax.get_ylim()
    log = ax.get_yscale() == "log"
    to = (lambda v: np.log10(v)) if log else (lambda v: v)
    back = (lambda v: 10**v) if log else (lambda v: v)
    gap = 0.06 * (to(hi) - to(lo))
    placed: list[float] = []
    drawable = [e for e in ends if np.isfinite(e[0]) and (e[0] > 0 or not log)]
    for y, text, color in sorted(drawable, key=lambda e: e[0]):
        pos = max(to(y), placed[-1] + gap) if placed else to(y)
        placed.append(pos)
        ax.annotate(text, xy=(1.0, back(pos)), xycoords=("axes fraction", "data"),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8,
                    color=color, annotation_clip=False)  # fmt: skip


def convergence_figure(runs: list[Run], references: list[Run] = ()) -> Figure | None:
    """Accuracy vs round and vs MB on the network per node, for one config over one or more seeds.

    Thin lines: every node of every seed. Thick: mean over nodes (and seeds), with a band of
    +- std over seeds (several seeds) or min-max over nodes (one seed). Dashed black: the
    centralized reference (its curve against rounds, its final value against MB). Orange: the
    accuracy on unseen classes, when the run measured it. None before any evaluation.
    """
    curves = [c for c in (node_curve(r) for r in runs) if c is not None]
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    thin = max(0.08, 0.35 / len(curves))
    for c in curves:
        for j in range(c.values.shape[1]):
            axes[0].plot(c.rounds, c.values[:, j], color=MAIN, alpha=thin, lw=0.7)
            axes[1].plot(c.mb[:, j], c.values[:, j], color=MAIN, alpha=thin, lw=0.7)
    band = seed_band(curves)
    if band.std is not None:
        lo, hi = band.mean - band.std, band.mean + band.std
        spread = f"band: +-std over {band.seeds} seeds"
    else:
        lo, hi = curves[0].values.min(axis=1), curves[0].values.max(axis=1)
        spread = "band: min-max over nodes"
    ends = [[], []]
    for ax, x, end in zip(axes, (band.rounds, band.mb), ends, strict=True):
        ax.fill_between(x, lo, hi, color=MAIN, alpha=0.15)
        ax.plot(x, band.mean, color=MAIN, lw=2.2)
        end.append((band.mean[-1], f"mean {band.mean[-1]:.1f}%", MAIN))
    unseen = [c for c in (node_curve(r, "unseen_accuracy") for r in runs) if c is not None]
    if unseen:
        u = seed_band(unseen)
        for ax, x, end in zip(axes, (u.rounds, u.mb), ends, strict=True):
            if u.std is not None:
                ax.fill_between(x, u.mean - u.std, u.mean + u.std, color=UNSEEN, alpha=0.15)
            ax.plot(x, u.mean, color=UNSEEN, lw=1.8, ls="-.")
            end.append((u.mean[-1], f"unseen classes {u.mean[-1]:.1f}%", UNSEEN))
    ref_curves = [c for c in (node_curve(r) for r in references) if c is not None]
    if ref_curves:
        ref = seed_band(ref_curves)
        axes[0].plot(ref.rounds, ref.mean, color=REFERENCE, ls="--", lw=1.5)
        axes[1].axhline(ref.mean[-1], color=REFERENCE, ls="--", lw=1.5)
        for end in ends:
            end.append((ref.mean[-1], f"centralized {ref.mean[-1]:.1f}%", REFERENCE))
    nodes = curves[0].values.shape[1]
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, end, xlabel in zip(axes, ends, ("round", "MB on the network per node"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        label_ends(ax, end)
    axes[0].set_ylabel("test accuracy (%)")
    if not band.mb.any():
        axes[1].set_title("no bytes sent", fontsize=9)
    config = runs[0].config
    suptitle(fig, f"{config['strategy']}: {describe(config)}",
             f"thin: each of {nodes} node(s); {spread}")  # fmt: skip
    return fig


def _natural(values: list) -> list:
    """Numbers in numeric order, anything else in string order."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=str)


def comparison_figure(
    runs: list[Run],
    line: str,
    panels: tuple[str, ...] = (),
    metric: str = "accuracy",
    xs: tuple[str, ...] = ("round", "mb"),
    references: list[Run] = (),
) -> Figure:
    """One curve per value of ``line``: mean over nodes, +-std over seeds.

    One column of panels per combination of ``panels`` values, one row per x axis (``round``,
    ``mb``, ``time``: simulated seconds). The centralized reference is a black dashed line when
    every curve of a panel shares it, or a dotted line in each curve's colour when it differs
    between curves (e.g. one per alpha).
    """
    combos = list(dict.fromkeys(tuple(r.config[k] for k in panels) for r in runs))
    values = _natural(list({r.config[line] for r in runs}))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(xs), len(combos), figsize=(5.2 * len(combos), 3.8 * len(xs)),
                             squeeze=False, sharey=True, layout="constrained")  # fmt: skip
    for col, combo in enumerate(combos):
        in_panel = [r for r in runs if tuple(r.config[k] for k in panels) == combo]
        ends: list[list] = [[] for _ in xs]
        refs = []
        for i, value in enumerate(values):
            group = [r for r in in_panel if r.config[line] == value]
            curves = [c for c in (node_curve(r, metric) for r in group) if c is not None]
            if not curves:
                continue
            color = colors[i % len(colors)]
            band = seed_band(curves)
            for row, x in enumerate(xs):
                level = _draw_band(axes[row][col], band, x, color)
                text = f"{value}: {band.mean[-1]:.1f}%" + (" (sends nothing)" if level else "")
                ends[row].append((band.mean[-1], text, color))
            seeds = {r.config["seed"] for r in group}
            matched = matching_references(group[0].config, list(references), seeds)
            ref_curves = [c for c in (node_curve(r, metric) for r in matched) if c is not None]
            if ref_curves:
                dirs = tuple(sorted(str(r.dir) for r in matched))
                refs.append((dirs, seed_band(ref_curves).mean[-1], color, value))
        shared = len({d for d, _, _, _ in refs}) == 1
        for row, _ in enumerate(xs):
            ax = axes[row][col]
            for _, level, color, value in refs[:1] if shared else refs:
                color = REFERENCE if shared else color
                ax.axhline(level, color=color, lw=1.2, ls="--" if shared else ":")
                name = "centralized" if shared else f"centralized ({value})"
                ends[row].append((level, f"{name} {level:.1f}%", color))
            ax.grid(alpha=0.3)
            ax.set_ylim(0, 100)
            label_ends(ax, ends[row])
        axes[0][col].set_title(
            ", ".join(f"{k}={v}" for k, v in zip(panels, combo, strict=True)), fontsize=9
        )
    for row, x in enumerate(xs):
        axes[row][0].set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
        for ax in axes[row]:
            ax.set_xlabel(X_LABELS[x])
            if x == "round":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    note = "; black dashed (or dotted, per colour): centralized reference" if references else ""
    suptitle(fig, f"one curve per {line}: mean over nodes, band +-std over seeds{note}",
             describe(runs[0].config, (line, *panels)))  # fmt: skip
    return fig


X_LABELS = {"round": "round", "mb": "MB on the network per node",
            "time": "simulated time (s)"}  # fmt: skip


def _draw_band(ax: Axes, band: SeedBand, x: str, color: str) -> bool:
    """A mean curve and its +-std band against rounds, simulated time or MB (log axis).

    On MB, a run that sends nothing becomes a dotted level at its final value (returns True).
    """
    if x == "round":
        xs, keep = band.rounds, np.ones(len(band.mean), bool)
    elif x == "time":
        xs, keep = band.time, ~np.isnan(band.time)
    else:
        xs, keep = band.mb, band.mb > 0
        if not keep.any():
            ax.axhline(band.mean[-1], color=color, ls=(0, (1, 3)), lw=1.5)
            return True
        ax.set_xscale("log")
        # plain numbers, and only 1, 2 and 5 of each decade (the default crowds short ranges)
        ax.xaxis.set_major_formatter(FuncFormatter(_plain))
        ax.xaxis.set_minor_formatter(FuncFormatter(_plain))
    ax.plot(xs[keep], band.mean[keep], color=color, lw=2)
    if band.std is not None:
        ax.fill_between(xs[keep], (band.mean - band.std)[keep], (band.mean + band.std)[keep],
                        color=color, alpha=0.15)  # fmt: skip
    return False


def _plain(value: float, _pos: int) -> str:
    """A log-axis tick label: ``value`` plainly when its leading digit is 1, 2 or 5."""
    lead = round(value / 10 ** np.floor(np.log10(value))) if value > 0 else 0
    return f"{value:g}" if lead in (1, 2, 5) else ""


def consensus_figure(run: Run) -> Figure | None:
    """Consensus distance of the evaluated models (log scale): all mixed parameters, by group.

    Measured on the models the nodes evaluate (after combining), every ``eval-every`` rounds;
    None when nothing positive was measured (fewer than two nodes, nothing mixed, or nodes that
    agree exactly, like fedavg's).
    """
    # a log axis shows positive values only (fedavg's nodes agree exactly: 0 every time)
    rows = [n for n in run.network if (n.get("consensus_distance") or 0) > 0]
    if not rows:
        return None
    rounds = [n["round"] for n in rows]
    by_group = [n.get("consensus_by_group") or {} for n in rows]
    groups = [g for g in GROUP_ORDER if any(g in b for b in by_group)]
    fig, axes = plt.subplots(1, 1 + bool(groups), figsize=(5.5 * (1 + bool(groups)), 4),
                             squeeze=False, layout="constrained")  # fmt: skip
    axes = axes[0]
    axes[0].semilogy(rounds, [n["consensus_distance"] for n in rows], color=REFERENCE, lw=2)
    axes[0].set_title("all mixed parameters", fontsize=9)
    if groups:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        ends = []
        for i, g in enumerate(groups):
            ys = [b.get(g, np.nan) for b in by_group]
            axes[1].semilogy(rounds, ys, color=colors[i % len(colors)], lw=1.6)
            ends.append((ys[-1], g, colors[i % len(colors)]))
        axes[1].set_title("per parameter group (they sum to the left)", fontsize=9)
        label_ends(axes[1], ends)
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(r"$\frac{1}{n}\sum_i \|x_i - \bar{x}\|^2$")
    suptitle(fig, f"consensus distance of the evaluated models, {run.config['strategy']}",
             describe(run.config))  # fmt: skip
    return fig


class SavedPartitions(Partitioner):
    """flwr-datasets' ``Partitioner`` view of partitions built already, for its plot helpers."""

    def __init__(self, partitions: tuple[Dataset, ...], dataset: Dataset) -> None:
        super().__init__()
        self._partitions = partitions
        self.dataset = dataset

    @property
    def num_partitions(self) -> int:
        """Number of partitions (nodes)."""
        return len(self._partitions)

    def load_partition(self, partition_id: int) -> Dataset:
        """The partition of node ``partition_id``."""
        return self._partitions[partition_id]


def label_figure(run: Run) -> Figure | None:
    """Samples per class (columns) held by each node (rows), counts written in the cells.

    Drawn with flwr-datasets' ``plot_label_distributions`` (heatmap) over the partitions rebuilt
    from the run's config (the same partitioner, placement and seed; nothing trains), and next
    to it the heterogeneity of ``summary.json``: each node's size and label entropy, and the
    mean label distance (total variation) across the graph's edges and across all pairs. None
    for the centralized reference, which has no nodes.
    """
    from flwr_datasets.visualization import plot_label_distributions

    from flower_p2p.data import data_summary, load_data

    cfg = ExperimentConfig.from_run_config(run.config)
    if cfg.strategy == "centralized":
        return None
    bundle = load_data(cfg)
    het = data_summary(cfg)["heterogeneity"]
    n, k = len(bundle.partitions), bundle.num_classes
    fig, (ax, side) = plt.subplots(
        1, 2, figsize=(3.4 + 0.55 * k, 1.4 + 0.35 * n), layout="constrained",
        width_ratios=(k, 5),
    )  # fmt: skip
    plot_label_distributions(
        SavedPartitions(bundle.partitions, bundle.union()),
        label_name=bundle.label_column,
        plot_type="heatmap",
        partition_id_axis="y",
        axis=ax,
        legend=True,
        title="training samples per class and node",
        plot_kwargs={"annot": n <= 40 and k <= 30, "annot_kws": {"fontsize": 7}},
    )
    ax.title.set_fontsize(9)
    ax.set_ylabel("node")
    ax.set_xlabel("class")
    heterogeneity_panel(side, het)
    suptitle(fig, describe(run.config))
    return fig


def heterogeneity_panel(ax: Axes, het: dict) -> None:
    """Node sizes (bars, node 0 on top like the heatmap) with label entropies; TV in the title."""
    n = len(het["size"])
    ax.barh(np.arange(n) + 0.5, het["size"], color="tab:gray", height=0.7)
    for i, (size, h) in enumerate(zip(het["size"], het["label_entropy"], strict=True)):
        ax.text(size, i + 0.5, f" H={h:.2f}", va="center", fontsize=7)
    ax.set_ylim(n, 0)
    ax.set_yticks([])
    ax.set_xlabel("samples\n(H: label entropy, bits)")
    ax.set_xlim(0, 1.45 * max(het["size"]))
    edge, pairs, ratio = het["edge_tv"], het["all_pairs_tv"], het["edge_to_all_pairs"]
    first = f"label TV: edges {edge:.2f}" if edge is not None else "label TV: no graph"
    parts = (f"all pairs {pairs:.2f}" if pairs is not None else "",
             f"ratio {ratio:.2f}" if ratio is not None else "")  # fmt: skip
    second = ", ".join(x for x in parts if x)
    ax.set_title(f"{first}\n{second}", fontsize=8)


SCHEDULES_DRAWN_ON_A_CIRCLE = ("directed-exponential", "one-peer-exponential", "random-matching")
LABELLED_NODES_MAX = 48  # node ids drawn on the topology plot up to this many nodes


def topology_figure(run: Run) -> Figure | None:
    """The communication graph, nodes coloured by final accuracy (None for one-model runs)."""
    from flower_p2p.schedules import is_schedule, period_spectral_gap, topology_at

    cfg = ExperimentConfig.from_run_config(run.config)
    if cfg.num_nodes < 2 or cfg.strategy == "centralized":
        return None  # one model, no graph
    topo = topology_at(cfg, 1)
    curve = node_curve(run)
    final = (
        curve.values[-1] if curve is not None and curve.values.shape[1] == cfg.num_nodes else None
    )
    fig, ax = plt.subplots(figsize=(5, 5))
    circular = ("ring", "exponential", *SCHEDULES_DRAWN_ON_A_CIRCLE)
    pos = nx.circular_layout(topo.graph) if cfg.topology in circular else (
        nx.spring_layout(topo.graph, seed=cfg.seed))  # fmt: skip
    colors = final if final is not None else "tab:blue"
    # ids stay readable up to a few dozen nodes; past that, smaller unlabelled dots
    labelled = cfg.num_nodes <= LABELLED_NODES_MAX
    size = 420 if labelled else max(4.0, 420 * LABELLED_NODES_MAX / cfg.num_nodes)
    drawn = nx.draw_networkx_nodes(topo.graph, pos, ax=ax, node_color=colors, cmap="viridis",
                                   vmin=0, vmax=100, node_size=size)  # fmt: skip
    nx.draw_networkx_edges(topo.graph, pos, ax=ax, alpha=0.5 if labelled else 0.2,
                           node_size=size, width=1.0 if labelled else 0.3)  # fmt: skip
    if labelled:
        nx.draw_networkx_labels(topo.graph, pos, ax=ax, font_size=8, font_color="white")
    if final is not None:
        fig.colorbar(drawn, ax=ax, shrink=0.7, label="final test accuracy (%)")
    gap = period_spectral_gap(cfg)
    title = f"{cfg.topology}" + (" (round 1)" if is_schedule(cfg.topology) else f", {cfg.mixing}")
    title += f", {cfg.num_nodes} nodes" if not labelled else ""
    # 3 significant digits: a 1,024-node ring's 1.25e-05 is not "0.000"
    title += f", spectral gap {gap:.3g}" if gap is not None else ""
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def _pool(run_dir: Path) -> list[Run]:
    """The finished runs of the compare or sweep folder that ``run_dir`` belongs to."""
    collection = collection_of(run_dir)
    return collect_runs(collection) if collection else []


def plot_run(run_dir: Path | str, references: list[Run] | None = None) -> list[Path]:
    """Every plot of one run folder; returns the paths written.

    ``references``: centralized runs to draw; by default those of the compare or sweep folder the
    run is in that match its config and seed.
    """
    run = load_run(Path(run_dir))
    if references is None:
        references = [] if run.is_reference else matching_references(run.config, _pool(run.dir))
    return _plot_run(run, references)


def _plot_run(run: Run, references: list[Run]) -> list[Path]:
    from sim.attention import attention_figure

    figures = {
        "convergence.png": convergence_figure([run], references),
        "topology.png": topology_figure(run),
        "consensus.png": consensus_figure(run),
        "labels.png": label_figure(run),
        "attention.png": attention_figure(run, references[0] if references else None),
    }
    return [save(fig, run.dir / name) for name, fig in figures.items() if fig is not None]


def plot_collection(folder: Path, per_run: bool = True) -> list[Path]:
    """Plots of a compare or sweep folder.

    Every run's own plots (``per_run``), then, in ``plots/``, each config's convergence over its
    seeds (when it has several) and one comparison per key that varies between the runs.
    """
    runs = collect_runs(folder)
    if not runs:
        raise ConfigError(
            "folder", str(folder), "a run, compare or sweep folder with finished runs"
        )
    references = [r for r in runs if r.is_reference]
    compared = [r for r in runs if not r.is_reference] or runs
    paths = []
    for run in runs if per_run else ():
        refs = [] if run.is_reference else matching_references(run.config, references)
        paths += _plot_run(run, refs)
    keys = varying_keys(compared)
    out = folder / "plots"
    for group in group_seeds(compared).values():
        if len(group) > 1:
            seeds = {r.config["seed"] for r in group}
            refs = matching_references(group[0].config, references, seeds)
            name = run_name({k: group[0].config[k] for k in keys})
            fig = convergence_figure(group, refs)
            if fig is not None:
                paths.append(save(fig, out / f"convergence-{name}.png"))
    metrics = ["accuracy"] + (["unseen_accuracy"] if _has(compared, "unseen_accuracy") else [])
    # runs whose rounds last different simulated times (sync vs async, other speeds): a row
    # against simulated time too
    xs = ("round", "mb", "time") if len(round_times(compared)) > 1 else ("round", "mb")
    for key in keys:
        for metric in metrics:
            others = tuple(k for k in keys if k != key)
            fig = comparison_figure(compared, key, others, metric, xs, references=references)
            suffix = "" if metric == "accuracy" else "-unseen"
            paths.append(save(fig, out / f"compare-{key}{suffix}.png"))
    fig = heterogeneity_figure(compared, keys, references)
    if fig is not None:
        paths.append(save(fig, out / "accuracy-vs-edge-tv.png"))
    return paths


def round_times(runs: list[Run]) -> set:
    """The distinct simulated durations of a round among ``runs`` (and their modes)."""
    found = set()
    for run in runs:
        first = [m["sim_time"] for m in run.metrics if m["round"] == 1 and m.get("sim_time")]
        found.add((run.config.get("mode", "sync"), round(first[0], 9) if first else None))
    return found


def edge_tv(run: Run) -> float | None:
    """The run's mean label distance across graph edges (summary.json), None if not recorded."""
    return (run.summary.get("heterogeneity") or {}).get("edge_tv")


def heterogeneity_figure(
    runs: list[Run], keys: list[str], references: list[Run] = ()
) -> Figure | None:
    """Final mean node accuracy against edge heterogeneity, one marker per config.

    A marker is the mean over the config's seeds (bars: +-std over seeds, when several) at its
    seeds' mean ``edge_tv``. Colour: the config's values of the varying keys other than
    ``placement``; marker: its placement. The centralized reference of each colour is a dashed
    line in that colour (black when every colour shares one reference): references differ
    between partitioners and feature skews, and one line for all would compare each run with
    the others' reference. None with fewer than two runs that recorded ``edge_tv``.
    """
    points = [r for r in runs if edge_tv(r) is not None and "accuracy_mean" in r.summary]
    if len(points) < 2:
        return None
    colour_keys = [k for k in keys if k != "placement"]

    def label_of(run: Run) -> str:
        return run_name({k: run.config[k] for k in colour_keys}) or "runs"

    labels = _natural(list({label_of(r): None for r in points}))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shapes = {"random": "o", "clustered": "s", "spread": "^"}
    fig, ax = plt.subplots(figsize=(8.6, 4.4), layout="constrained")
    refs: dict[str, tuple[tuple, float]] = {}  # colour label -> (reference runs, mean accuracy)
    for group in group_seeds(points).values():
        label = label_of(group[0])
        colour = colours[labels.index(label) % len(colours)]
        accs = [100 * r.summary["accuracy_mean"] for r in group]
        spread = float(np.std(accs, ddof=1)) if len(accs) > 1 else None
        ax.errorbar(float(np.mean([edge_tv(r) for r in group])), float(np.mean(accs)),
                    yerr=spread, fmt=shapes.get(group[0].config.get("placement", "random"), "o"),
                    color=colour, ms=6, capsize=3)  # fmt: skip
        seeds = {r.config["seed"] for r in group}
        matched = [r for r in matching_references(group[0].config, list(references), seeds)
                   if "accuracy_mean" in r.summary]  # fmt: skip
        if matched:
            refs[label] = (
                tuple(sorted(str(r.dir) for r in matched)),
                float(np.mean([100 * r.summary["accuracy_mean"] for r in matched])),
            )
    for i, label in enumerate(labels if colour_keys else ()):
        ax.scatter([], [], color=colours[i % len(colours)], label=label)
    for placement, shape in shapes.items():
        if any(r.config.get("placement", "random") == placement for r in points):
            ax.scatter([], [], color="gray", marker=shape, label=f"placement={placement}")
    if len({dirs for dirs, _ in refs.values()}) == 1:
        level = next(iter(refs.values()))[1]
        ax.axhline(level, color="black", ls="--", lw=1, label="centralized")
    else:
        for label, (_, level) in refs.items():
            ax.axhline(level, color=colours[labels.index(label) % len(colours)], ls="--", lw=1)
        if refs:
            ax.plot([], [], color="gray", ls="--", lw=1, label="centralized (its colour)")
    ax.set_xlabel("mean label TV across graph edges (edge_tv)")
    ax.set_ylabel("final mean node accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside, not over
    seeds = sorted({r.config["seed"] for r in points})
    suptitle(fig, f"accuracy against edge heterogeneity (mean over {len(seeds)} seed(s))",
             describe(points[0].config, tuple(keys)))  # fmt: skip
    return fig


def _has(runs: list[Run], key: str) -> bool:
    return any(m.get(key) is not None for r in runs for m in r.metrics)


def plot_folder(folder: Path | str) -> list[Path]:
    """Regenerate every plot of a run, compare or sweep folder from its saved files."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return plot_run(folder)
    paths = plot_collection(folder)
    if (folder / "sweep.json").exists():
        from sim.sweep import write_sweep_table

        write_sweep_table(folder)
        paths += [folder / "sweep.md", folder / "sweep.csv"]
    return paths
