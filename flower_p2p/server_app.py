"""ServerApp: only the network. It relays each node's message to that node's neighbours.

It never combines models. From the models the nodes report after evaluating it computes one
monitoring figure (consensus distance, ``flower_p2p.consensus``), which nothing feeds back into
training. As the network it also decides the faults
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
    Checkpoint,
    commit,
    open_out_dir,
    remove_temp_files,
    round_dir,
    write_relay_state,
)
from flower_p2p.config import ExperimentConfig
from flower_p2p.consensus import ConsensusMeter
from flower_p2p.data import load_data
from flower_p2p.faults import FaultLog
from flower_p2p.models import apply_finetune, create_model, shared_names
from flower_p2p.network import CENTRALIZED_NODE, Network, Traffic
from flower_p2p.node import algorithm_for
from flower_p2p.results import (
    FINAL_DIR,
    package_versions,
    resolve_out_dir,
    write_json,
    write_jsonl,
)
from flower_p2p.schedules import period_spectral_gap, topology_at
from flower_p2p.wire import MONITOR, from_record, pack_inbox, payload_bytes, to_record
from strategies.fedavg import COUNT_KEY as FEDAVG_COUNT_KEY

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


class Recorder:
    """metrics.jsonl (per round and node) and network.jsonl (per round), rewritten as they grow.

    A network record of round r is complete once the models after round r were evaluated (in
    round r + 1's exchange): only then is it written, with their consensus distance.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.records: dict[tuple[int, int], dict] = {}
        self.network: list[dict] = []
        self.pending: dict | None = None

    def update(self, rnd: int, node: int, **values: float | None) -> None:
        """Merge values into the record of (round, node)."""
        rec = self.records.setdefault(
            (rnd, node),
            {"round": rnd, "node": node, "accuracy": None, "unseen_accuracy": None, "loss": None,
             "train_loss": None, "bytes_sent": 0, "bytes_received": 0, "network_bytes": 0},
        )  # fmt: skip
        rec.update(values)

    def close_round(self, record: dict) -> None:
        """Round ``record['round']`` is over; its record waits for the next evaluation."""
        self.complete_pending(None)
        self.pending = record

    def complete_pending(self, by_group: dict[str, float] | None) -> None:
        """Write the waiting round record, with the consensus of its evaluated models if any."""
        if self.pending is None:
            return
        self.pending["consensus_distance"] = sum(by_group.values()) if by_group else None
        self.pending["consensus_by_group"] = by_group or None
        self.network.append(self.pending)
        self.pending = None

    def flush(self) -> None:
        """Rewrite metrics.jsonl and network.jsonl with everything recorded so far."""
        ordered = [self.records[k] for k in sorted(self.records)]
        write_jsonl(self.out / "metrics.jsonl", ordered)
        write_jsonl(self.out / "network.jsonl", self.network)

    def round_accuracies(self, rnd: int, key: str = "accuracy") -> list[float]:
        """Accuracies (or another metric ``key``) recorded for round ``rnd``."""
        return [r[key] for (t, _), r in self.records.items() if t == rnd and r[key] is not None]


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


class Relay:
    """One run's network as the ServerApp plays it: deliver, collect the replies, count, record.

    Messages and their routes come from ``network.Network`` (also used by the plain loop);
    bytes from ``network.Traffic``; the relay combines no model.
    """

    def __init__(self, grid: Grid, cfg: ExperimentConfig, out: Path, node_ids: dict[int, int]):
        self.grid, self.cfg, self.out, self.node_ids = grid, cfg, out, node_ids
        self.pid_of = {nid: pid for pid, nid in node_ids.items()}
        self.network = Network(cfg, algorithm_for(cfg))
        self.nodes = self.network.nodes
        self.rec = Recorder(out)
        self.traffic = Traffic.start(self.nodes)
        self.faults = FaultLog()
        # Messages sent in the last round, delivered (minus lost links) in the next one.
        self.last_out: dict[int, ArrayRecord] = {}
        self.start = time.perf_counter()
        for p in self.nodes:
            self.rec.update(0, p, **self.traffic.record(p))

    def restore(self, resumed: Checkpoint) -> int:
        """Continue from a checkpoint: the nodes restore theirs; returns the next round."""
        errors = _ask_every_node(self.grid, self.node_ids, "restore", resumed.folder)
        if errors:
            raise RuntimeError(f"could not restore {resumed.folder}: {'; '.join(errors)}")
        state = resumed.relay
        self.rec.records = {(r["round"], r["node"]): r for r in state["records"]}
        self.rec.network, self.rec.pending = state["network"], state["pending"]
        self.traffic = Traffic.from_dict(state["traffic"])
        self.faults = FaultLog.from_dict(state["faults"])
        self.last_out = {j: to_record(m) for j, m in resumed.last_out.items()}
        self.start = time.perf_counter() - state["elapsed_s"]
        log(INFO, "resuming after round %d from %s", resumed.round, resumed.folder)
        return resumed.round + 1

    def exchange(self, rnd: int, evaluate: bool, kind: str) -> dict:
        """Round ``rnd``: deliver round ``rnd - 1``'s messages, collect replies; its faults."""
        delivery = self.network.deliver(rnd, self.last_out)
        self.faults.planned(delivery.plan)
        self.faults.link_drops += delivery.lost
        final_dir = str(self.out / FINAL_DIR) if kind == MessageType.EVALUATE else ""
        msgs = []
        for p, inbox in delivery.inboxes.items():
            self._count_delivery(rnd, p, inbox)
            fraction = self.cfg.straggler_fraction if p in delivery.plan.stragglers else 1.0
            msgs.append(_train_message(rnd, evaluate, inbox, self.node_ids[p], kind, fraction,
                                       final_dir))  # fmt: skip
        meter = ConsensusMeter()
        new_out: dict[int, ArrayRecord] = {}
        failed = []
        for reply in self.grid.send_and_receive(msgs) if msgs else []:
            pid = self.pid_of[reply.metadata.src_node_id]
            if reply.has_error():
                self._node_failed(pid, rnd, reply)  # counts as dropped for this round
                failed.append(pid)
                continue
            m = reply.content.metric_records["metrics"]
            if evaluate:
                self.rec.update(rnd - 1, pid, accuracy=m["accuracy"], loss=m["loss"],
                                unseen_accuracy=m.get("unseen_accuracy"))  # fmt: skip
                if MONITOR in reply.content.array_records:
                    meter.add(from_record(reply.content.array_records[MONITOR]))
            if kind == MessageType.TRAIN:
                payload = reply.content.array_records["out"]
                if len(payload):
                    new_out[pid] = payload
                    receivers = 1 if self.network.server_average else len(
                        self.network.receivers(pid, rnd))  # fmt: skip
                    self.traffic.count_sent(pid, int(m["payload_bytes"]), receivers)
                self.rec.update(rnd, pid, train_loss=m["train_loss"])
        if evaluate:
            self.rec.complete_pending(meter.by_group())
        if kind == MessageType.TRAIN:
            self.last_out = new_out
            for p in self.nodes:  # dropped and failed nodes too: nothing trained or sent
                self.rec.update(rnd, p, **self.traffic.record(p))
        return {"dropped": sorted(delivery.plan.dropped),
                "stragglers": sorted(delivery.plan.stragglers),
                "link_drops": delivery.lost, "failed": sorted(failed)}  # fmt: skip

    def _count_delivery(self, rnd: int, node: int, inbox: dict[int, ArrayRecord]) -> None:
        """Bytes delivered to ``node`` now belong to the round they were sent in (``rnd - 1``)."""
        if self.network.server_average:
            # the (virtual) server's broadcast of the average: the model without the count
            upload = next(iter(inbox.values()), None)
            model = {} if upload is None else {
                k: v for k, v in upload.items() if k != FEDAVG_COUNT_KEY}  # fmt: skip
            self.traffic.count_delivery(node, [], ArrayRecord(model).count_bytes() if model else 0)
        else:
            self.traffic.count_delivery(node, [payload_bytes(m) for m in inbox.values()])
        self.rec.update(rnd - 1, node, **self.traffic.record(node))

    def _node_failed(self, pid: int, rnd: int, reply: Message) -> None:
        if reply.error.code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION:
            # Not the node's code but the runtime (e.g. Ray killed a worker when memory ran
            # out): later rounds would fail too, so stop rather than train nothing.
            raise RuntimeError(
                f"the simulation runtime failed for node {pid} in round {rnd}: "
                f"{reply.error.reason}"
                + ("; continue with resume=true" if self.cfg.checkpoint_every else "")
            )
        self.faults.error(pid, rnd, reply.error.reason)

    def checkpoint(self, rnd: int) -> None:
        """Nodes write their state, then the relay its own, then the manifest commits."""
        folder = round_dir(self.out, rnd)
        errors = _ask_every_node(self.grid, self.node_ids, "checkpoint", folder)
        if errors:
            log(WARNING, "checkpoint after round %d skipped: %s", rnd, "; ".join(errors))
            return
        relay_state = {
            "records": [self.rec.records[k] for k in sorted(self.rec.records)],
            "network": self.rec.network,
            "pending": self.rec.pending,
            "traffic": self.traffic.to_dict(),
            "faults": self.faults.to_dict(),
            "elapsed_s": self.elapsed(),
        }
        last_out = {j: from_record(m) for j, m in self.last_out.items()}
        write_relay_state(folder, relay_state, last_out)
        commit(self.out, rnd, self.cfg.to_run_config())

    def elapsed(self) -> float:
        """Seconds since the run started (resumed runs include the interrupted part)."""
        return time.perf_counter() - self.start

    def run(self, first_round: int) -> None:
        """Rounds ``first_round`` .. num-rounds, then the final evaluation."""
        cfg = self.cfg
        for rnd in range(first_round, cfg.num_rounds + 1):
            evaluate = (rnd - 1) % cfg.eval_every == 0
            round_faults = self.exchange(rnd, evaluate, MessageType.TRAIN)
            # Timings live here, not in metrics.jsonl, so that metrics.jsonl is deterministic.
            self.rec.close_round({"round": rnd, "wall_s": self.elapsed(), "faults": round_faults})
            self.rec.flush()
            if cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0:
                self.checkpoint(rnd)
            accs = self.rec.round_accuracies(rnd - 1)
            if accs:  # evaluation happens every eval-every rounds, on the combined models
                log(INFO, "round %d/%d  mean node accuracy after round %d: %.1f%% (worst "
                    "%.1f%%)  elapsed %.1fs", rnd, cfg.num_rounds, rnd - 1, 100 * np.mean(accs),
                    100 * np.min(accs), self.elapsed())  # fmt: skip
        self.exchange(cfg.num_rounds + 1, True, MessageType.EVALUATE)
        self.rec.flush()


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
    relay = Relay(grid, cfg, out, discover_nodes(grid, nodes))
    relay.run(relay.restore(resumed) if resumed is not None else 1)
    summary = {**summarize(cfg, relay.rec, relay.traffic, relay.elapsed()), "prefix_cache": cache}
    summary["faults"] = relay.faults.to_dict()
    write_json(out / "summary.json", summary)
    log(
        INFO,
        "done: mean accuracy %.2f%% (worst node %.2f%%), %.1fs; results in %s",
        100 * summary["accuracy_mean"], 100 * summary["accuracy_min"], summary["wall_s"], out,
    )  # fmt: skip
    from sim.plots import plot_run

    plot_run(out)
    return out


def summarize(cfg: ExperimentConfig, rec: Recorder, traffic: Traffic, wall_s: float) -> dict:
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
        **traffic.summary(),
        "wall_s": wall_s,
    }
