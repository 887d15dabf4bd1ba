"""The small Flower runs that several test files check, each run once per test session.

Every strategy, fine-tune mode and kind of graph (static, directed, per-round; with faults) runs
once through Flower's simulation engine, long enough to learn: 4 nodes, 8 rounds of 4 local
steps, a depth-1 ViT on 16x16 images, mild label skew. All of them run one after another in a
single Flower simulation (``small_runs_app``: Ray starts once), each the project's own
experiment with its relay behind a Grid that records every message (``relay_capture_app``), so
the same runs serve the accuracy floors (test_end_to_end.py) and the neighbour-only checks
(test_neighbour_only.py).
"""

from __future__ import annotations

from pathlib import Path

from flower_p2p.config import ExperimentConfig

BASE = dict(num_nodes=4, num_rounds=8, local_steps=4, depth=1, img_size=16, alpha=1.0,
            lr_schedule="constant", lr=3e-3, eval_every=4)  # fmt: skip

# name: (config changes, floor on the mean node accuracy, floor on the worst node). Floors sit
# about 15 points below what these runs reached here (mean / worst, noted per line). Every
# strategy and every fine-tune mode appears at least once (a mode rides along with a strategy:
# one Flower run each costs ~20 s of start-up on 2 cores).
CASES = {
    "dsgd": ({}, 0.55, 0.5),  # 0.70 / 0.68
    "choco-8bit": ({"strategy": "choco", "compressor": "8bit", "gamma": 1.0}, 0.55, 0.5),  # .70/.67
    "gradient-tracking-head": (
        {"strategy": "gradient-tracking", "finetune": "head", "lr": 1e-2},
        0.6,
        0.6,
    ),  # 0.79 / 0.78  # fmt: skip
    "push-sum-directed": (
        {"strategy": "push-sum", "topology": "directed-exponential"},
        0.5,
        0.45,
    ),  # 0.67 / 0.63  # fmt: skip
    "fedavg": ({"strategy": "fedavg"}, 0.55, 0.55),  # 0.73 / 0.73
    "centralized-last-k": (
        {"strategy": "centralized", "finetune": "last-k", "lr": 1e-2},
        0.5,
        0.5,
    ),  # 0.67  # fmt: skip
    "local": ({"strategy": "local"}, 0.25, 0.15),  # 0.41 / 0.31: no communication
    "choco-one-peer": (
        {
            "strategy": "choco",
            "compressor": "none",
            "gamma": 1.0,
            "topology": "one-peer-exponential",
        },
        0.45,
        0.4,
    ),  # 0.62 / 0.59  # fmt: skip
    # a fresh random matching every round, with node dropout and lost links
    "dsgd-random-matching-faults": (
        {"topology": "random-matching", "link_drop": 0.25, "node_dropout": 0.2, "seed": 1},
        0.3,
        0.2,
    ),  # 0.44 / 0.30  # fmt: skip
    # every node holds 3 classes, ring neighbours none in common (test_unseen.py reads it too);
    # nodes 0-2 on one SuperNode, node 3 on another: one Flower message for each, and the
    # plain loop's numbers all the same (nodes-per-supernode changes no number)
    "relay-sum-unseen": (
        {
            "strategy": "relay-sum",
            "partitioner": "unseen",
            "classes_per_node": 3,
            "unseen_layout": "disjoint-neighbours",
            "nodes_per_supernode": 3,
        },
        0.4,
        0.3,
    ),  # 0.59 / 0.47; unseen classes 0.53 / 0.38  # fmt: skip
    "k-gt-lora": ({"strategy": "k-gt", "finetune": "lora", "lr": 1e-2}, 0.7, 0.7),  # .89/.88
    "qg-dsgdm": ({"strategy": "qg-dsgdm", "optimizer": "sgd", "lr": 0.05}, 0.4, 0.4),  # .57/.54
    # the tracker's correction inside AdamW's gradient; stragglers report the mean gradient of
    # fewer steps
    "k-gt-grad-stragglers": ({"strategy": "k-gt-grad", "straggler": 0.3}, 0.63, 0.6),  # .78/.76
    # the user's own partitioner class (loaded in the simulation's workers too), placed on the
    # ring to keep neighbours' label distributions apart, and a noise shift per node
    "dsgd-own-partition-skew": (
        {
            "partitioner": "tests/every_kth_partitioner.py:EveryKth",
            "placement": "spread",
            "feature_skew": "noise",
        },
        0.6,
        0.55,
    ),  # 0.76 / 0.72  # fmt: skip
    # mode=async with equal speeds and no latency: the same schedule as sync, the same numbers
    "dsgd-async-equal-speeds": ({"mode": "async"}, 0.55, 0.5),  # 0.70 / 0.68, as dsgd
    # a quarter of the nodes 4x slower, spread speeds and link latencies: fast nodes run ahead;
    # with dropouts, lost messages, a failing node and checkpoints (none changes the schedule's
    # timing, and every call must still combine exactly what the clock delivered)
    "dsgd-async-slow-nodes-faults": (
        {
            "mode": "async",
            "slow_fraction": 0.25,
            "speed_spread": 0.3,
            "latency": 0.5,
            "latency_spread": 0.5,
            "node_dropout": 0.1,
            "link_drop": 0.1,
            "fail_every": 5,
            "checkpoint_every": 3,
        },
        0.65,
        0.6,
    ),  # 0.88 / 0.88  # fmt: skip
    # AD-PSGD: pairwise averaging at the end of every activation, same clock and faults
    "ad-psgd-slow-nodes-faults": (
        {
            "strategy": "ad-psgd",
            "mode": "async",
            "slow_fraction": 0.25,
            "speed_spread": 0.3,
            "latency": 0.5,
            "latency_spread": 0.5,
            "node_dropout": 0.1,
            "link_drop": 0.1,
            "checkpoint_every": 3,
        },
        0.45,
        0.3,
    ),  # 0.61 / 0.45 (0.76 / 0.67 without faults: about 3 in 10 exchanges fail here)  # fmt: skip
}


def case_config(name: str, out: str = "") -> ExperimentConfig:
    """The validated config of case ``name`` (``out``: its results folder)."""
    cfg = ExperimentConfig(out_dir=out, **{**BASE, **CASES[name][0]})
    cfg.validate()
    return cfg


class SmallRuns:
    """Every case through Flower, in one simulation on first use; the results folder of each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ran = False

    def __call__(self, name: str) -> Path:
        """The results folder of case ``name`` (relay_log.json: every message relayed)."""
        from sim.engine import CLIENT_APP, run_app

        if not self.ran:
            self.ran = True
            nodes = max(case_config(c).num_nodes for c in CASES)
            run_app({"root": str(self.root), "cases": ",".join(CASES)}, nodes,
                    "small_runs_app:app", CLIENT_APP)  # fmt: skip
        out = self.root / name
        if not (out / "summary.json").exists():
            raise RuntimeError(f"small run {name} did not finish (see the simulation's log)")
        return out
