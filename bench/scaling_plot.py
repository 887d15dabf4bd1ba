"""Measurement 4's figure: wall time per round and peak memory against nodes, log-log."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from flower_p2p.results import atomic_write_bytes  # noqa: E402

# Issue 13's goals at 1,024 nodes.
GOAL_ROUND_S, GOAL_PEAK_GIB = 5.0, 6.0


def plot_scaling(rows: list[dict], path: Path, hosted: list[dict] | None = None) -> Path:
    """Two log-log panels from measurement 4's rows (``nodes``, ``round_s``, ``peak_gib``).

    The dotted line is cost proportional to nodes through the smallest run: a curve above it
    grows faster than the nodes. Dashed: the goals. ``hosted``: rows run with several graph
    nodes per SuperNode (``per_supernode`` each), drawn as a series per value.
    """
    rows = sorted(rows, key=lambda r: r["nodes"])
    nodes = [r["nodes"] for r in rows]
    by_per: dict[int, list[dict]] = {}
    for r in hosted or []:
        by_per.setdefault(int(r["per_supernode"]), []).append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    label = "measured (median of rounds)" if not by_per else "1 graph node per SuperNode"
    left.plot(nodes, [r["round_s"] for r in rows], "o-", color="tab:blue", label=label)
    colours = ["tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for (per, series), colour in zip(sorted(by_per.items()), colours * len(by_per), strict=False):
        series = sorted(series, key=lambda r: r["nodes"])
        x = [r["nodes"] for r in series]
        left.plot(x, [r["round_s"] for r in series], "s--", color=colour,
                  label=f"{per} graph nodes per SuperNode")  # fmt: skip
        right.plot(x, [r["peak_gib"] for r in series], "s--", color=colour,
                   label=f"{per} per SuperNode")  # fmt: skip
    left.plot(nodes, [rows[0]["round_s"] * n / nodes[0] for n in nodes], ":", color="grey",
              label=f"proportional to nodes (from {nodes[0]})")  # fmt: skip
    left.axhline(GOAL_ROUND_S, ls="--", color="tab:red", label=f"goal: {GOAL_ROUND_S:g} s")
    left.set(ylabel="wall time per round (s)", title="time")
    right.plot(
        nodes,
        [r["peak_gib"] for r in rows],
        "o-",
        color="tab:blue",
        label="peak PSS, all processes" + (", 1 per SuperNode" if by_per else ""),
    )
    right.axhline(GOAL_PEAK_GIB, ls="--", color="tab:red", label=f"goal: < {GOAL_PEAK_GIB:g} GiB")
    right.set(ylabel="peak memory (GiB)", title="memory")
    for ax in (left, right):
        ax.set(xscale="log", yscale="log", xlabel="nodes (head-only)")
        ax.set_xticks(nodes, [str(n) for n in nodes])
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
