"""ServerApp: only the network. It relays each node's message to that node's neighbours.

It never combines models. From what it relays it computes one monitoring figure (consensus
distance), which nothing feeds back into training. As the network it also decides the faults
of a simulated run (``flower_p2p.faults``: dropped nodes get no message, lost messages are not
delivered). It writes the results folder and, every ``checkpoint-every`` rounds, has the nodes
and then itself write a checkpoint (``flower_p2p.checkpoint``).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from flower_p2p import prefix_cache
from flower_p2p.checkpoint import (
    commit,
    open_out_dir,
    remove_temp_files,
    round_dir,
    write_relay_state,
)
from flower_p2p.config import ExperimentConfig
from flower_p2p.data import load_data
from flower_p2p.faults import FaultLog, deliver, fault_plan
from flower_p2p.models import apply_finetune, create_model, param_group, shared_names
from flower_p2p.node import CENTRALIZED_NODE, algorithm_for, senders
from flower_p2p.results import (
    FINAL_DIR,
    package_versions,
    resolve_out_dir,
    write_json,
    write_jsonl,
)
from flower_p2p.schedules import period_spectral_gap, topology_at
from flower_p2p.wire import from_record, pack_inbox, to_record

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


def consensus_by_group(messages: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Monitoring only: mean over nodes of ||x_i - mean_j x_j||^2 over the relayed arrays.

    Split by parameter group (``param_group``: attn, mlp, norm, head, ...); the groups sum to the
    consensus distance over all relayed arrays.
    """
    keys = sorted(set.intersection(*(set(m) for m in messages)))
    if len(messages) < 2 or not keys:
        return {}
    by_group: dict[str, float] = {}
    for k in keys:
        stack = np.stack([m[k].astype(np.float64) for m in messages])
        spread = float(((stack - stack.mean(axis=0)) ** 2).sum()) / len(messages)
        by_group[param_group(k)] = by_group.get(param_group(k), 0.0) + spread
    return by_group


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
            {"round": rnd, "node": node, "accuracy": None, "unseen_accuracy": None, "loss": None,
             "train_loss": None, "bytes_sent": 0},
        )  # fmt: skip
        rec.update(values)

    def flush(self) -> None:
        """Rewrite metrics.jsonl and network.jsonl with everything recorded so far."""
        ordered = [self.records[k] for k in sorted(self.records)]
        write_jsonl(self.out / "metrics.jsonl", ordered)
        write_jsonl(self.out / "network.jsonl", self.network)

    def round_accuracies(self, rnd: int, key: str = "accuracy") -> list[float]:
        """Accuracies (or another metric ``key``) recorded for round ``rnd``."""
        return [r[key] for (t, _), r in self.records.items() if t == rnd and r[key] is not None]


def neighbour_inbox(
    node: int, neighbours: tuple[int, ...], last_out: dict[int, ArrayRecord]
) -> dict[int, ArrayRecord]:
    """What the relay delivers to ``node``: the last message of each of its neighbours, only."""
    return {j: last_out[j] for j in neighbours if j in last_out}


def _train_message(
    rnd: int,
    evaluate: bool,
    inbox: dict[int, ArrayRecord],
    node_id: int,
    kind: str,
    steps_fraction: float = 1.0,
    final_dir: str = "",
) -> Message:
    config = {"round": rnd, "evaluate": evaluate, "steps-fraction": steps_fraction}
    if final_dir:  # the final evaluation: nodes save their model there (for `sim plot`)
        config["final-dir"] = final_dir
    content = RecordDict({"config": ConfigRecord(config)})
    pack_inbox(content, inbox)
    return Message(content, dst_node_id=node_id, message_type=kind, group_id=str(rnd))


def _ask_every_node(grid: Grid, node_ids: dict[int, int], action: str, path: Path) -> list[str]:
    """Send a ``query.<action>`` naming ``path`` to every node; the errors of those that failed."""
    msgs = [
        Message(RecordDict({"config": ConfigRecord({"path": str(path)})}), dst_node_id=nid,
                message_type=f"{MessageType.QUERY}.{action}")
        for nid in node_ids.values()
    ]  # fmt: skip
    pid_of = {nid: pid for pid, nid in node_ids.items()}
    replies = list(grid.send_and_receive(msgs))
    errors = [
        f"node {pid_of[r.metadata.src_node_id]}: {r.error.reason}" for r in replies if r.has_error()
    ]
    if len(replies) < len(msgs):
        errors.append(f"{len(msgs) - len(replies)} node(s) did not reply")
    return errors


def run_experiment(grid: Grid, cfg: ExperimentConfig) -> Path:
    """Run every round through ``grid`` and write the results folder; returns its path."""
    out = resolve_out_dir(cfg.out_dir, cfg.strategy)
    cache = preflight(cfg)
    resumed = open_out_dir(out, cfg.to_run_config(), cfg.resume, cfg.overwrite)
    if resumed is None:
        write_json(
            out / "config.json",
            {"config": cfg.to_run_config(), "seed": cfg.seed, "versions": package_versions()},
        )
    else:
        remove_temp_files(out)
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
    faults = FaultLog()
    # Messages sent in the last round, delivered (minus lost links) in the next one.
    last_out: dict[int, ArrayRecord] = {}
    first_round, elapsed = 1, 0.0
    if resumed is not None:
        errors = _ask_every_node(grid, node_ids, "restore", resumed.folder)
        if errors:
            raise RuntimeError(f"could not restore {resumed.folder}: {'; '.join(errors)}")
        relay_state = resumed.relay
        rec.records = {(r["round"], r["node"]): r for r in relay_state["records"]}
        rec.network = relay_state["network"]
        sent = {int(p): v for p, v in relay_state["sent"].items()}
        faults = FaultLog.from_dict(relay_state["faults"])
        last_out = {j: to_record(m) for j, m in resumed.last_out.items()}
        first_round, elapsed = resumed.round + 1, relay_state["elapsed_s"]
        log(INFO, "resuming after round %d from %s", resumed.round, resumed.folder)
    else:
        for p in nodes:
            rec.update(0, p, bytes_sent=0)
    start = time.perf_counter() - elapsed

    def relay(rnd: int, evaluate: bool, kind: str) -> dict:
        """One round: deliver, collect replies; returns the round's fault record."""
        nonlocal last_out
        plan = fault_plan(cfg, rnd)
        faults.planned(plan)
        active = [p for p in nodes if p not in plan.dropped]
        msgs, lost = [], 0
        for p in active:
            inbox, n_lost = deliver(plan, p, senders(cfg, algo, p, rnd - 1), last_out)
            lost += n_lost
            fraction = cfg.straggler_fraction if p in plan.stragglers else 1.0
            final_dir = str(out / FINAL_DIR) if kind == MessageType.EVALUATE else ""
            msgs.append(
                _train_message(rnd, evaluate, inbox, node_ids[p], kind, fraction, final_dir)
            )
        faults.link_drops += lost
        new_out: dict[int, ArrayRecord] = {}
        failed = []
        for reply in grid.send_and_receive(msgs) if msgs else []:
            pid = pid_of[reply.metadata.src_node_id]
            if reply.has_error():
                if reply.error.code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION:
                    # Not the node's code but the runtime (e.g. Ray killed a worker when memory
                    # ran out): later rounds would fail too, so stop rather than train nothing.
                    raise RuntimeError(
                        f"the simulation runtime failed for node {pid} in round {rnd}: "
                        f"{reply.error.reason}"
                        + ("; continue with resume=true" if cfg.checkpoint_every else "")
                    )
                faults.error(pid, rnd, reply.error.reason)  # counts as dropped for this round
                failed.append(pid)
                continue
            m = reply.content.metric_records["metrics"]
            if evaluate:
                rec.update(rnd - 1, pid, accuracy=m["accuracy"], loss=m["loss"],
                           unseen_accuracy=m.get("unseen_accuracy"))  # fmt: skip
            if kind == MessageType.TRAIN:
                payload = reply.content.array_records["out"]
                if len(payload):
                    new_out[pid] = payload
                # A P2P node unicasts its message to each neighbour: that is what it sends.
                sent[pid] += int(m["payload_bytes"]) * fan_out(pid, rnd)
                rec.update(rnd, pid, train_loss=m["train_loss"], bytes_sent=sent[pid])
        if kind == MessageType.TRAIN:
            last_out = new_out
            for p in nodes:  # dropped and failed nodes: a record with nothing trained or sent
                rec.update(rnd, p, bytes_sent=sent[p])
        return {"dropped": sorted(plan.dropped), "stragglers": sorted(plan.stragglers),
                "link_drops": lost, "failed": sorted(failed)}  # fmt: skip

    def checkpoint(rnd: int) -> None:
        """Nodes write their state, then the relay its own, then the manifest commits."""
        folder = round_dir(out, rnd)
        errors = _ask_every_node(grid, node_ids, "checkpoint", folder)
        if errors:
            log(WARNING, "checkpoint after round %d skipped: %s", rnd, "; ".join(errors))
            return
        relay_state = {
            "records": [rec.records[k] for k in sorted(rec.records)],
            "network": rec.network,
            "sent": {str(p): v for p, v in sent.items()},
            "faults": faults.to_dict(),
            "elapsed_s": time.perf_counter() - start,
        }
        write_relay_state(folder, relay_state, {j: from_record(m) for j, m in last_out.items()})
        commit(out, rnd, cfg.to_run_config())

    for rnd in range(first_round, cfg.num_rounds + 1):
        evaluate = (rnd - 1) % cfg.eval_every == 0
        round_faults = relay(rnd, evaluate, MessageType.TRAIN)
        cd, by_group = None, None
        if algo.message_is_model and len(last_out) == len(nodes):
            by_group = consensus_by_group([from_record(last_out[p]) for p in nodes])
            cd = sum(by_group.values()) if by_group else float("nan")
        # Timings live here, not in metrics.jsonl, so that metrics.jsonl is deterministic.
        rec.network.append(
            {"round": rnd, "consensus_distance": cd, "consensus_by_group": by_group,
             "wall_s": time.perf_counter() - start, "faults": round_faults}
        )  # fmt: skip
        rec.flush()
        if cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0:
            checkpoint(rnd)
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
    summary["faults"] = faults.to_dict()
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
    # over the nodes that lack some class (None when every node has seen every class)
    unseen = rec.round_accuracies(cfg.num_rounds, "unseen_accuracy")
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
