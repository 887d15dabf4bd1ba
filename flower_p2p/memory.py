"""How much memory a run needs, estimated before any node trains, and the refusal when it won't fit.

Where memory goes in a Flower simulation of this app:

* the **driver** (the process that runs the relay and Flower's simulation engine) keeps every
  node's ``Context.state`` (its trainable parameters, optimizer moments and algorithm state) and
  every node's last reply (its messages), plus copies of the nodes in flight to the actors;
* each **ClientApp actor** (one per CPU, or per GPU share) holds one model and its gradients,
  shared by the nodes it serves (``node.node_model``), the activations of one batch, the node in
  flight (its state, inbox and message, each also deserialised), and the preprocessed data of the
  nodes it has served (up to ``node.RUNTIME_CACHE_BYTES``: Ray may hand it every node) and of
  the test set;
* every process starts from an interpreter with torch, flwr and Ray loaded (``BASE``).

What an algorithm keeps and sends is measured by running it (``strategies.footprint``), the
activations of one batch by running the model on one batch of zeros and summing what autograd
saves for backward. The constants were fitted to measured peaks (``python -m bench --only 6``,
README "Performance"), where the estimate is compared with what runs used.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flower_p2p.config import ExperimentConfig
from flower_p2p.node import RUNTIME_CACHE_BYTES, algorithm_for
from flower_p2p.registry import ConfigError
from flower_p2p.schedules import reach_topology, topology_at
from strategies.footprint import Footprint, footprint

GIB = 2**30
# Fitted to the peaks of ``python -m bench --only 6`` (2026-11-30, README "Performance"): the
# default model and ViT-S/16 (22 M parameters) with full fine-tuning on 8 and 16 nodes, DSGD and
# K-GT, and 256 head-only nodes. Resident memory (PSS) of a process before it holds anything of
# the run: Python with torch, timm, flwr and datasets imported.
BASE_DRIVER = int(1.0 * GIB)
BASE_ACTOR = int(0.85 * GIB)
BASE_RAY = int(0.25 * GIB)  # raylet, GCS, dashboard and runtime-env agents, idle workers
# The driver keeps one copy of every node's state and last messages; while nodes run it also
# holds, per actor, a few more of one node's state, messages and inbox (the Context on its way
# out, the reply on its way back, their serialised bytes): 8 -> 16 nodes of ViT-S added 0.93 of
# a node's state and messages per node, on top of ~6 node-sized copies with 2 actors.
DRIVER_IN_FLIGHT_PER_ACTOR = 3.25
# An actor holds the node in flight about four times over (Context in, its deserialised arrays,
# the optimizer's moments as tensors, the reply out): 3.1 GiB measured for ViT-S, 8 or 16 nodes.
ACTOR_COPIES = 4.0
# Ray's memory monitor kills workers above this fraction of the machine's memory.
RAY_KILL_FRACTION = 0.95


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs, by process; ``describe`` says where they go."""

    nodes: int
    actors: int
    node_state: int  # kept between rounds by one node: parameters, optimizer, algorithm
    message: int  # sent by one node in a round
    inbox: int  # the largest inbox
    model: int  # one model with gradients for what trains
    activations: int  # saved for backward by one batch
    node_data: int  # one node's preprocessed training data (the largest node)
    test_data: int  # the test set(s) a process preprocesses once
    driver: int
    actor: int

    @property
    def total(self) -> int:
        """Everything the run's processes hold at their peak, together."""
        return BASE_RAY + self.driver + self.actors * self.actor

    def summary(self) -> dict[str, float | int]:
        """The estimate by process, in GiB, for summary.json."""
        return {"total_gib": round(self.total / GIB, 3), "driver_gib": round(self.driver / GIB, 3),
                "actor_gib": round(self.actor / GIB, 3), "actors": self.actors}  # fmt: skip

    def describe(self) -> str:
        """Where the memory goes, in words and GiB."""
        g = _readable
        return (
            f"about {g(self.total)} in all: the driver {g(self.driver)} ({self.nodes} nodes x "
            f"{g(self.node_state + self.message)} of state and messages), {self.actors} actor(s) x "
            f"{g(self.actor)} (model {g(self.model)}, activations {g(self.activations)}, data "
            f"{g(self.node_data)} per node)"
        )


def _readable(b: float) -> str:
    """A size in the unit that keeps it readable: 25 GiB, 3.19 GiB, 420 MiB, 97 KiB."""
    if b >= 10 * GIB:
        return f"{b / GIB:.0f} GiB"
    if b >= GIB:
        return f"{b / GIB:.2f} GiB"
    if b >= 2**20:
        return f"{b / 2**20:.0f} MiB"
    return f"{b / 2**10:.0f} KiB"


def optimizer_slots(cfg: ExperimentConfig) -> int:
    """Tensors the optimizer keeps per trainable tensor (AdamW: 2 moments; SGD: momentum)."""
    if cfg.optimizer == "adamw":
        return 2
    # QG-DSGDm keeps its momentum in the algorithm's state, not the optimizer's
    return 1 if cfg.momentum > 0 and cfg.strategy != "qg-dsgdm" else 0


def algorithm_footprint(cfg: ExperimentConfig, degree: int) -> Footprint:
    """What the run's algorithm keeps, sends and receives per node with ``degree`` neighbours."""
    # no validation: a graph of degree + 1 nodes need not suit the run's topology
    return footprint(lambda n: algorithm_for(dataclasses.replace(cfg, num_nodes=n)), degree)


def activation_bytes(model: nn.Module, batch: int, image_shape: tuple[int, ...]) -> int:
    """Bytes autograd saves for backward in one training step on a batch of ``batch`` images."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # a tensor saved twice (or views of one storage) is held once
        key = (t.untyped_storage().data_ptr(), t.device.type)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(torch.zeros(batch, *image_shape))
        del out
    finally:
        model.train(was_training)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(b for (ptr, _), b in seen.items() if ptr not in params)


def max_in_degree(cfg: ExperimentConfig) -> int:
    """The most senders any node hears in a round (a copy-keeping algorithm: over the run)."""
    if cfg.strategy == "centralized" or cfg.num_nodes < 2:
        return 0
    if algorithm_for(cfg).keeps_neighbour_copies:
        ins = reach_topology(cfg).in_neighbours
    else:
        ins = topology_at(cfg, 1).in_neighbours
    return max(len(s) for s in ins)


def num_actors(cfg: ExperimentConfig) -> int:
    """ClientApp actors the simulation starts: one per CPU (``sim.engine.backend_config``)."""
    return max(1, min(cfg.num_nodes, os.cpu_count() or 1))


def estimate(
    cfg: ExperimentConfig,
    model: nn.Module,
    trainable: list[str],
    max_degree: int,
    partition_sizes: list[int],
    num_test: int,
    bytes_per_sample: int,
) -> MemoryEstimate:
    """The memory ``cfg`` needs, from its model, graph and data.

    ``bytes_per_sample``: what one preprocessed training image costs a node (its tensor, or its
    cached activations with the frozen-prefix cache on); ``num_test``: test images a process
    preprocesses.
    """
    named = dict(model.named_parameters())
    element = next(iter(named.values())).element_size() if named else 4
    train_elems = sum(named[n].numel() for n in trainable if n in named)
    all_elems = sum(p.numel() for p in model.parameters())
    per_model = element * train_elems
    fp = algorithm_footprint(cfg, max(1, max_degree))
    node_state = int(per_model * (1 + optimizer_slots(cfg) + fp.state))
    message, inbox = int(per_model * fp.sent), int(per_model * fp.received)
    side = cfg.img_size or 224
    batch = min(cfg.batch_size, max(partition_sizes))
    acts = activation_bytes(model, batch, (3, side, side)) if train_elems else 0
    model_bytes = element * (all_elems + train_elems)  # parameters, gradients of what trains
    actors = num_actors(cfg) if cfg.strategy != "centralized" else 1
    node_data = bytes_per_sample * max(partition_sizes)
    # any actor may serve every node: it keeps their data up to the runtime cache's bound
    data = min(bytes_per_sample * sum(partition_sizes), RUNTIME_CACHE_BYTES + node_data)
    test_data = 4 * 3 * side * side * num_test
    nodes = len(partition_sizes)
    # nodes-per-supernode: one Flower message carries that many nodes' states and inboxes
    hosted = 1 if cfg.strategy == "centralized" else cfg.nodes_per_supernode
    in_flight = DRIVER_IN_FLIGHT_PER_ACTOR * actors * hosted * (node_state + message + inbox)
    driver = BASE_DRIVER + nodes * (node_state + message) + int(in_flight) + test_data
    actor = (BASE_ACTOR + model_bytes + acts + data + test_data
             + int(ACTOR_COPIES * hosted * (node_state + inbox + message)))  # fmt: skip
    return MemoryEstimate(nodes, actors, node_state, message, inbox, model_bytes, acts,
                          node_data, test_data, driver, actor)  # fmt: skip


def available_bytes() -> int:
    """Memory this machine can still give a run before Ray's memory monitor kills a worker.

    ``MemAvailable`` less what Ray keeps back (it kills above 95 % of the machine's memory).
    """
    info = _meminfo()
    return max(0, info["MemAvailable"] - int((1 - RAY_KILL_FRACTION) * info["MemTotal"]))


def _meminfo() -> dict[str, int]:
    path = Path("/proc/meminfo")
    if path.exists():
        fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "MemTotal")}
    import psutil  # not Linux: Ray's own dependency

    vm = psutil.virtual_memory()
    return {"MemAvailable": int(vm.available), "MemTotal": int(vm.total)}


def check_fits(
    cfg: ExperimentConfig, need: MemoryEstimate, limit: int | None = None, started: bool = False
) -> None:
    """Refuse a run whose estimate exceeds ``limit`` (memory-limit-gb, else what is available).

    ``started``: the run's processes already hold their base memory (the check inside the
    ServerApp, after the simulation started them), so it is not counted twice against what the
    machine has available.
    """
    if cfg.memory_limit_gb > 0:
        limit = int(cfg.memory_limit_gb * GIB)
    elif limit is None:
        limit = available_bytes()
        if started:
            limit += BASE_RAY + BASE_DRIVER + need.actors * BASE_ACTOR
    if need.total <= limit:
        return
    where = (f"memory-limit-gb is {_readable(limit)}" if cfg.memory_limit_gb > 0
             else f"this machine has {_readable(limit)} available")  # fmt: skip
    hints = []
    if cfg.finetune == "full":
        hints.append("finetune=head, last-k or lora")
    hints += ["fewer nodes (num-nodes)", "a smaller batch-size or img-size", "a smaller model"]
    raise ConfigError(
        "num-nodes", cfg.num_nodes,
        f"a run that fits in memory: this one needs {need.describe()}, but {where}; use "
        f"{', '.join(hints)}, or set memory-limit-gb=<GiB> to run it "
        "anyway if the estimate is wrong for this machine",
    )  # fmt: skip


__all__ = ["MemoryEstimate", "activation_bytes", "algorithm_footprint", "available_bytes",
           "check_fits", "estimate", "max_in_degree", "num_actors", "optimizer_slots"]  # fmt: skip
