"""ServerApp: only the network. It relays each node's message to that node's neighbours.

The relaying is ``gossip_strategy.GossipStrategy``, a Flower strategy started where a federated
app would start ``FedAvg``: it delivers each node's messages to its neighbours only, decides the
faults of a simulated run (``flower_p2p.faults``), computes one monitoring figure (consensus
distance of the evaluated models, which nothing feeds back into training) and checkpoints. This
module validates the config, prepares the results folder, starts the strategy, and writes the
summary and plots. Nothing here combines models.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import networkx as nx
import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flower_p2p import prefix_cache
from flower_p2p.async_relay import AsyncGossipStrategy
from flower_p2p.checkpoint import (
    open_out_dir,
    remove_temp_files,
)
from flower_p2p.config import ExperimentConfig
from flower_p2p.data import data_summary, load_data
from flower_p2p.gossip_strategy import GossipStrategy
from flower_p2p.hosting import HostingGrid
from flower_p2p.memory import MemoryEstimate, check_fits, estimate, max_in_degree
from flower_p2p.models import apply_finetune, create_model, shared_names
from flower_p2p.network import Traffic
from flower_p2p.node import eval_copies
from flower_p2p.recorder import Recorder
from flower_p2p.results import (
    package_versions,
    resolve_out_dir,
    write_json,
)
from flower_p2p.schedules import period_spectral_gap, topology_at

app = ServerApp()
# From this many nodes, Flower's ~10 ms per message dominates a head-only round: say so.
LARGE_RUN = 128


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, then relay gossip rounds and write the results folder."""
    cfg = ExperimentConfig.from_run_config(dict(context.run_config))
    run_experiment(grid, cfg)


@dataclass(frozen=True)
class Preflight:
    """What the checks before training decided: the frozen-prefix cache and the memory needed."""

    cache: str  # the cache decision for the largest node, in words
    memory: MemoryEstimate


def preflight(cfg: ExperimentConfig, started: bool = False) -> Preflight:
    """Everything that can be wrong with the config, checked before any node trains.

    A run that would not fit in memory is refused here too (``memory.check_fits``). ``started``:
    the run's processes (this one, Ray's, the actors) already run, so their base memory is
    already out of what the machine has available.
    """
    if cfg.num_nodes >= 2:
        topology_at(cfg, 1)  # graph connectivity, mixing weights
    bundle = load_data(cfg)  # node count vs samples, columns, partitioner feasibility
    # model name, overrides, checkpoint shape, fine-tune mode (e.g. last-k within the depth)
    model, trainable = apply_finetune(create_model(cfg, bundle.num_classes), cfg)
    shared_names(trainable, cfg)  # `share` names groups that train
    # prefix-cache=on where no prefix is frozen, or past cache-max-mb, is refused here
    sizes = [len(p) for p in bundle.partitions]
    if cfg.strategy == "centralized":
        sizes = [sum(sizes)]
    side = cfg.img_size or 224
    num_test = eval_copies(cfg) * len(bundle.test)  # feature skew: the node's domain copy too
    cache = prefix_cache.plan(
        cfg, model, trainable, max(sizes), num_test, (3, side, side), torch.device("cpu")
    )
    per_sample = cache.bytes_per_image if cache.on else 4 * 3 * side * side
    need = estimate(cfg, model, trainable, max_in_degree(cfg), sizes, num_test, per_sample)
    check_fits(cfg, need, started=started)
    return Preflight(cache.reason, need)


def run_experiment(grid: Grid, cfg: ExperimentConfig) -> Path:
    """Run every round through ``grid`` and write the results folder; returns its path."""
    out = resolve_out_dir(cfg.out_dir, cfg.strategy)
    checked = preflight(cfg, started=True)
    resumed = open_out_dir(out, cfg.to_run_config(), cfg.resume, cfg.overwrite)
    if resumed is None:
        write_json(
            out / "config.json",
            {"config": cfg.to_run_config(), "seed": cfg.seed, "versions": package_versions()},
        )
    else:
        remove_temp_files(out)
    log(INFO, "flower-p2p: strategy=%s, %d nodes, results in %s", cfg.strategy, cfg.num_nodes, out)
    log(INFO, "frozen-prefix cache %s", checked.cache)
    log(INFO, "memory: %s", checked.memory.describe())
    kind = AsyncGossipStrategy if cfg.mode == "async" else GossipStrategy
    strategy = kind(cfg, out, configure_nodes=True)
    if hosted(cfg) > 1:  # several graph nodes per SuperNode: one Flower message for them all
        grid = HostingGrid(grid, cfg.num_nodes, hosted(cfg))
        log(INFO, "%d graph nodes per SuperNode (nodes-per-supernode)", hosted(cfg))
    elif cfg.num_nodes >= LARGE_RUN and cfg.strategy != "centralized":
        log(INFO, "%d nodes, one SuperNode each: nodes-per-supernode=16 sends one Flower message "
            "per 16 nodes, the same numbers in less time (README: Hundreds of nodes)",
            cfg.num_nodes)  # fmt: skip
    strategy.start(grid, ArrayRecord(), cfg.num_rounds, resume=resumed)
    summary = {**summarize(cfg, strategy.rec, strategy.traffic, strategy.elapsed()),
               "prefix_cache": checked.cache,
               "memory_estimate": checked.memory.summary(), "faults": strategy.faults.to_dict(),
               **data_summary(cfg)}  # fmt: skip
    write_json(out / "summary.json", summary)
    log(
        INFO,
        "done: mean accuracy %.2f%% (worst node %.2f%%), %.1fs; results in %s",
        100 * summary["accuracy_mean"], 100 * summary["accuracy_min"], summary["wall_s"], out,
    )  # fmt: skip
    from sim.plots import plot_run

    plot_run(out)
    return out


def hosted(cfg: ExperimentConfig) -> int:
    """Graph nodes per SuperNode: ``nodes-per-supernode``; the centralized reference has one."""
    return 1 if cfg.strategy == "centralized" else cfg.nodes_per_supernode


def summarize(cfg: ExperimentConfig, rec: Recorder, traffic: Traffic, wall_s: float) -> dict:
    """Final figures of a run (accuracy after the last round, bytes, spectral gap, time)."""
    accs = rec.round_accuracies(cfg.num_rounds)
    # over the nodes that lack some class (None when every node has seen every class)
    unseen = rec.round_accuracies(cfg.num_rounds, "unseen_accuracy")
    domain = rec.round_accuracies(cfg.num_rounds, "domain_accuracy")
    return {
        "strategy": cfg.strategy,
        # fedavg and centralized are references, not peer-to-peer learning
        "peer_to_peer": cfg.strategy not in ("fedavg", "centralized"),
        "num_nodes": cfg.num_nodes,
        "num_rounds": cfg.num_rounds,
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_min": float(np.min(accs)),
        "accuracy_max": float(np.max(accs)),
        "unseen_accuracy_mean": float(np.mean(unseen)) if unseen else None,
        "unseen_accuracy_min": float(np.min(unseen)) if unseen else None,
        # feature skew: accuracy on each node's own domain's copy of the test set
        "domain_accuracy_mean": float(np.mean(domain)) if domain else None,
        "domain_accuracy_min": float(np.min(domain)) if domain else None,
        # time-varying schedules: the gap of one period's product (None for random matchings);
        # relay-sum uses no mixing weights: its speed is its tree's diameter
        "spectral_gap": (
            period_spectral_gap(cfg)
            if cfg.num_nodes >= 2 and cfg.strategy not in ("centralized", "relay-sum")
            else None
        ),
        "relay_tree_diameter": (
            nx.diameter(topology_at(cfg, 1).graph) if cfg.strategy == "relay-sum" else None
        ),
        **traffic.summary(),
        "wall_s": wall_s,
    }
