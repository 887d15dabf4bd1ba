"""ServerApp: only the network. It relays each node's message to that node's neighbours.

It never combines models. From what it relays it computes one monitoring figure (consensus
distance), which nothing feeds back into training. It also writes the results folder.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flower_p2p import prefix_cache
from flower_p2p.config import ExperimentConfig
from flower_p2p.data import load_data
from flower_p2p.models import apply_finetune, create_model, shared_names
from flower_p2p.node import CENTRALIZED_NODE, algorithm_for, senders
from flower_p2p.results import (
    package_versions,
    prepare_out_dir,
    resolve_out_dir,
    write_json,
    write_jsonl,
)
from flower_p2p.schedules import period_spectral_gap, topology_at
from flower_p2p.wire import from_record, pack_inbox

app = ServerApp()

# Deployment SuperNodes connect over time; in simulation they are all there at once.
NODE_WAIT_S = 20.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, then relay gossip rounds and write the results folder."""
    cfg = ExperimentConfig.from_run_config(dict(context.run_config))
    run_experiment(grid, cfg)


def preflight(cfg: ExperimentConfig) -> str:
    """Everything that can be wrong with the config, checked before any node trains.

    Returns the frozen-prefix cache decision for the largest node, in words.
    """
    if cfg.num_nodes >= 2:
        topology_at(cfg, 1)  # graph connectivity, mixing weights
    bundle = load_data(cfg)  # node count vs samples, columns, partitioner feasibility
    # model name, overrides, checkpoint shape, fine-tune mode (e.g. last-k within the depth)
    model, trainable = apply_finetune(create_model(cfg, bundle.num_classes), cfg)
    shared_names(trainable, cfg)  # `share` names groups that train
    # prefix-cache=on where no prefix is frozen, or past cache-max-mb, is refused here
    sizes = [len(p) for p in bundle.partitions]
    largest = sum(sizes) if cfg.strategy == "centralized" else max(sizes)
    side = cfg.img_size or 224
    return prefix_cache.plan(
        cfg, model, trainable, largest, len(bundle.test), (3, side, side), torch.device("cpu")
    ).reason


def discover_nodes(grid: Grid, needed: list[int], wait_s: float = NODE_WAIT_S) -> dict[int, int]:
    """Map partition-id -> Flower node id by asking every connected node who it is."""
    deadline = time.monotonic() + wait_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= len(needed) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    queries = [
        Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY) for nid in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(queries):
        if reply.has_error():
            continue
        pid = int(reply.content.config_records["node"]["partition-id"])
        mapping[pid] = reply.metadata.src_node_id
    missing = [p for p in needed if p not in mapping]
    if missing:
        raise RuntimeError(
            f"num-nodes={len(needed)} needs SuperNodes with partition-id "
            f"{needed[0]}..{needed[-1]}, "
            f"but {len(node_ids)} connected (missing partition-ids {missing}). In simulation, run "
            f"`flwr run . --federation-config 'num-supernodes={max(needed) + 1}'`."
        )
    return {p: mapping[p] for p in needed}


def consensus_distance(messages: list[dict[str, np.ndarray]]) -> float:
    """Monitoring only: mean over nodes of ||x_i - mean_j x_j||^2 over the relayed arrays."""
    keys = sorted(set.intersection(*(set(m) for m in messages)))
    if len(messages) < 2 or not keys:
        return float("nan")
    total = 0.0
    for k in keys:
        stack = np.stack([m[k].astype(np.float64) for m in messages])
        total += float(((stack - stack.mean(axis=0)) ** 2).sum())
    return total / len(messages)


class Recorder:
    """Collects per-(round, node) metrics and writes them atomically as they complete."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.records: dict[tuple[int, int], dict] = {}
        self.network: list[dict] = []

    def update(self, rnd: int, node: int, **values: float | None) -> None:
        """Merge values into the record of (round, node)."""
        rec = self.records.setdefault(
            (rnd, node),
            {"round": rnd, "node": node, "accuracy": None, "loss": None, "train_loss": None,
             "bytes_sent": 0},
        )  # fmt: skip
        rec.update(values)

    def flush(self) -> None:
        """Rewrite metrics.jsonl and network.jsonl with everything recorded so far."""
        ordered = [self.records[k] for k in sorted(self.records)]
        write_jsonl(self.out / "metrics.jsonl", ordered)
        write_jsonl(self.out / "network.jsonl", self.network)

    def round_accuracies(self, rnd: int) -> list[float]:
        """Accuracies recorded for round ``rnd``."""
        return [
            r["accuracy"]
            for (t, _), r in self.records.items()
            if t == rnd and r["accuracy"] is not None
        ]


def neighbour_inbox(
    node: int, neighbours: tuple[int, ...], last_out: dict[int, ArrayRecord]
) -> dict[int, ArrayRecord]:
    """What the relay delivers to ``node``: the last message of each of its neighbours, only."""
    return {j: last_out[j] for j in neighbours if j in last_out}


def _train_message(
    rnd: int, evaluate: bool, inbox: dict[int, ArrayRecord], node_id: int, kind: str
) -> Message:
    content = RecordDict({"config": ConfigRecord({"round": rnd, "evaluate": evaluate})})
    pack_inbox(content, inbox)
    return Message(content, dst_node_id=node_id, message_type=kind, group_id=str(rnd))


def run_experiment(grid: Grid, cfg: ExperimentConfig) -> Path:
    """Run every round through ``grid`` and write the results folder; returns its path."""
    out = resolve_out_dir(cfg.out_dir, cfg.strategy)
    cache = preflight(cfg)
    prepare_out_dir(out, cfg.overwrite)
    write_json(
        out / "config.json",
        {"config": cfg.to_run_config(), "seed": cfg.seed, "versions": package_versions()},
    )
    log(INFO, "flower-p2p: strategy=%s, %d nodes, results in %s", cfg.strategy, cfg.num_nodes, out)
    log(INFO, "frozen-prefix cache %s", cache)
    nodes = [CENTRALIZED_NODE] if cfg.strategy == "centralized" else list(range(cfg.num_nodes))
    node_ids = discover_nodes(grid, nodes)
    pid_of = {nid: pid for pid, nid in node_ids.items()}
    algo = algorithm_for(cfg)
    relays = algo.communicates and cfg.strategy != "centralized"

    def fan_out(p: int, rnd: int) -> int:
        """How many nodes node p's round-``rnd`` message is unicast to."""
        if cfg.strategy == "fedavg":
            return 1  # the reference's one upload to a (virtual) server
        return len(topology_at(cfg, rnd).out_neighbours[p]) if relays else 0

    rec = Recorder(out)
    sent = dict.fromkeys(nodes, 0)
    last_out: dict[int, ArrayRecord] = {}
    start = time.perf_counter()

    def relay(rnd: int, evaluate: bool, kind: str) -> None:
        msgs = [
            _train_message(
                rnd,
                evaluate,
                neighbour_inbox(p, senders(cfg, algo, p, rnd - 1), last_out),
                node_ids[p],
                kind,
            )
            for p in nodes
        ]
        for reply in grid.send_and_receive(msgs):
            pid = pid_of[reply.metadata.src_node_id]
            if reply.has_error():
                raise RuntimeError(f"node {pid} failed in round {rnd}: {reply.error.reason}")
            m = reply.content.metric_records["metrics"]
            if evaluate:
                rec.update(rnd - 1, pid, accuracy=m["accuracy"], loss=m["loss"])
            if kind == MessageType.TRAIN:
                payload = reply.content.array_records["out"]
                if len(payload):
                    last_out[pid] = payload
                # A P2P node unicasts its message to each neighbour: that is what it sends.
                sent[pid] += int(m["payload_bytes"]) * fan_out(pid, rnd)
                rec.update(rnd, pid, train_loss=m["train_loss"], bytes_sent=sent[pid])

    for p in nodes:
        rec.update(0, p, bytes_sent=0)
    for rnd in range(1, cfg.num_rounds + 1):
        evaluate = (rnd - 1) % cfg.eval_every == 0
        relay(rnd, evaluate, MessageType.TRAIN)
        cd = None
        if algo.message_is_model and len(last_out) == len(nodes):
            cd = consensus_distance([from_record(last_out[p]) for p in nodes])
        # Timings live here, not in metrics.jsonl, so that metrics.jsonl is deterministic.
        rec.network.append(
            {"round": rnd, "consensus_distance": cd, "wall_s": time.perf_counter() - start}
        )
        rec.flush()
        accs = rec.round_accuracies(rnd - 1)
        if accs:  # evaluation happens every eval-every rounds, on the combined models
            log(
                INFO,
                "round %d/%d  mean node accuracy after round %d: %.1f%% (worst %.1f%%)  "
                "elapsed %.1fs",
                rnd, cfg.num_rounds, rnd - 1, 100 * np.mean(accs), 100 * np.min(accs),
                time.perf_counter() - start,
            )  # fmt: skip
    relay(cfg.num_rounds + 1, True, MessageType.EVALUATE)
    rec.flush()
    summary = {**summarize(cfg, rec, sent, time.perf_counter() - start), "prefix_cache": cache}
    write_json(out / "summary.json", summary)
    log(
        INFO,
        "done: mean accuracy %.2f%% (worst node %.2f%%), %.1fs; results in %s",
        100 * summary["accuracy_mean"], 100 * summary["accuracy_min"], summary["wall_s"], out,
    )  # fmt: skip
    from sim.plots import plot_run

    plot_run(out)
    return out


def summarize(
    cfg: ExperimentConfig,
    rec: Recorder,
    sent: dict[int, int],
    wall_s: float,
) -> dict:
    """Final figures of a run (accuracy after the last round, bytes, spectral gap, time)."""
    accs = rec.round_accuracies(cfg.num_rounds)
    return {
        "strategy": cfg.strategy,
        # fedavg and centralized are references, not peer-to-peer learning
        "peer_to_peer": cfg.strategy not in ("fedavg", "centralized"),
        "num_nodes": cfg.num_nodes,
        "num_rounds": cfg.num_rounds,
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_min": float(np.min(accs)),
        "accuracy_max": float(np.max(accs)),
        # time-varying schedules: the gap of one period's product (None for random matchings)
        "spectral_gap": (
            period_spectral_gap(cfg)
            if cfg.num_nodes >= 2 and cfg.strategy != "centralized"
            else None
        ),
        "total_bytes_sent": int(sum(sent.values())),
        "mean_bytes_sent_per_node": float(np.mean(list(sent.values()))),
        "wall_s": wall_s,
    }
