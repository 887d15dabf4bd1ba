"""Serverless gossip as a Flower strategy: the relay that replaces central aggregation.

``GossipStrategy`` is a ``flwr.serverapp.strategy.Strategy``. A ServerApp swaps it in as it would
``FedAvg``::

    GossipStrategy(cfg).start(grid, ArrayRecord(), num_rounds=cfg.num_rounds)

* ``configure_train`` builds each node's message: its round config and, as ``in:<j>`` records,
  the messages its in-neighbours sent last round (``network.Network``: the round's graph, minus
  lost links; dropped nodes get nothing). Nothing else reaches a node.
* ``aggregate_train`` aggregates no arrays: it keeps each node's reply (``out``, or ``out:<k>``
  per receiver) to deliver next round, counts the bytes (``network.Traffic``), records the
  metrics, and returns only metrics (``None`` for the arrays: there is no global model).
* ``configure_evaluate`` sends nothing until the last round, then delivers the last messages
  for a final evaluation of every node's combined model; ``aggregate_evaluate`` records it.

A ClientApp that takes part answers a ``query`` with its partition id (``gossip_node.identify``)
and, for ``train``/``evaluate``, combines its own model with the ``in:<j>`` records
(``gossip_node.GossipNode``, or the project's own ``client_app``). The strategy never combines a
model. With a results folder it writes metrics.jsonl and network.jsonl as rounds complete and,
every ``checkpoint-every`` rounds, a checkpoint (``start(..., resume=...)`` continues one).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result

from flower_p2p.checkpoint import Checkpoint, commit, round_dir, write_relay_state
from flower_p2p.clock import run_clock, sync_round_time
from flower_p2p.config import ExperimentConfig
from flower_p2p.consensus import ConsensusMeter
from flower_p2p.faults import FaultLog
from flower_p2p.gossip_node import ask_partition_ids
from flower_p2p.hosting import supernodes_needed
from flower_p2p.network import Network, Traffic
from flower_p2p.node import algorithm_for
from flower_p2p.progress import Progress
from flower_p2p.recorder import Recorder
from flower_p2p.results import FINAL_DIR
from flower_p2p.wire import (
    MONITOR,
    from_record,
    pack_inbox,
    payload_bytes,
    to_record,
    unpack_outbox,
)
from strategies.fedavg import COUNT_KEY as FEDAVG_COUNT_KEY

# Deployment SuperNodes connect over time; in simulation they are all there at once.
NODE_WAIT_S = 20.0


def discover_nodes(grid: Grid, needed: list[int], wait_s: float = NODE_WAIT_S) -> dict[int, int]:
    """Map partition-id -> Flower node id by asking every connected node who it is."""
    deadline = time.monotonic() + wait_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= len(needed) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    mapping = ask_partition_ids(grid)
    missing = [p for p in needed if p not in mapping]
    if missing:
        per = getattr(grid, "per_supernode", 1)  # HostingGrid: several graph nodes per SuperNode
        supernodes = supernodes_needed(max(needed) + 1, per)
        hosting = f" ({per} graph nodes per SuperNode)" if per > 1 else ""
        raise RuntimeError(
            f"num-nodes={len(needed)}{hosting} needs SuperNodes with partition-id "
            f"0..{supernodes - 1}, but {len(node_ids)} connected (missing graph nodes "
            f"{missing}). In simulation, run "
            f"`flwr run . --federation-config 'num-supernodes={supernodes}'`."
        )
    return {p: mapping[p] for p in needed}


def round_message(
    rnd: int,
    evaluate: bool,
    inbox: dict[int, ArrayRecord],
    node_id: int,
    kind: str,
    extra: dict | None = None,
) -> Message:
    """A node's ``train``/``evaluate`` message: its round config and its neighbours' messages."""
    config = {"round": rnd, "evaluate": evaluate, **(extra or {})}
    content = RecordDict({"config": ConfigRecord(config)})
    pack_inbox(content, inbox)
    return Message(content, dst_node_id=node_id, message_type=kind, group_id=str(rnd))


def ask_every_node(grid: Grid, node_ids: dict[int, int], action: str, config: dict) -> list[str]:
    """Send a ``query.<action>`` with ``config`` to every node; the errors of those that failed."""
    msgs = [
        Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=nid,
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


class GossipStrategy(Strategy):
    """Neighbour-only relaying of a gossip algorithm's messages; no arrays are ever aggregated.

    ``cfg`` names the nodes, graph, algorithm and faults (``ExperimentConfig``; another app sets
    the keys it needs, e.g. ``num_nodes``, ``topology``, ``strategy``, and leaves the rest).
    ``out``: the results folder (None: keep everything in memory only). ``configure_nodes``:
    first send every node the run config in a ``query.configure`` (the project's ClientApp
    answers it), so that one Flower run can hold several experiments one after another, each
    starting from a clean node state.
    """

    def __init__(
        self, cfg: ExperimentConfig, out: Path | None = None, configure_nodes: bool = False
    ) -> None:
        if cfg.mode != "sync" and type(self) is GossipStrategy:
            raise ValueError(f"mode={cfg.mode}: GossipStrategy relays rounds; start "
                             "flower_p2p.async_relay.AsyncGossipStrategy instead")  # fmt: skip
        self.cfg, self.out, self.configure_nodes = cfg, out, configure_nodes
        self.network = Network(cfg, algorithm_for(cfg))
        self.nodes = self.network.nodes
        self.rec = Recorder(out)
        self.traffic = Traffic.start(self.nodes)
        self.faults = FaultLog()
        # Messages sent in the last round, delivered (minus lost links) in the next one.
        self.last_out: dict[int, ArrayRecord | dict[int, ArrayRecord]] = {}
        self.node_ids: dict[int, int] = {}
        self.pid_of: dict[int, int] = {}
        self.started = time.perf_counter()
        self._round_faults: dict = {}
        self.progress = Progress(cfg.num_rounds)
        self._meter = ConsensusMeter()
        # simulated seconds of a round (sim_time in metrics.jsonl); none for the reference
        self.clock = run_clock(cfg)
        self.round_time = None if self.clock is None else sync_round_time(cfg, self.clock)
        for p in self.nodes:
            self.rec.update(0, p, sim_time=self._sim_time(0), **self.traffic.record(p))

    # ---- Flower's Strategy interface ---------------------------------------------------------

    def summary(self) -> None:
        """Log what the strategy relays."""
        log(INFO, "\t├── gossip algorithm: %s (serverless: no aggregation)", self.cfg.strategy)
        log(INFO, "\t├── nodes: %d, topology: %s", self.cfg.num_nodes, self.cfg.topology)
        log(INFO, "\t└── every node hears only its in-neighbours of the round's graph")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each node taking part gets its in-neighbours' last messages; ``arrays`` is unused.

        There is no global model to send: every node starts from its own (the same seed gives
        the same model), and ``config`` is added to every node's round config.
        """
        evaluate = (server_round - 1) % self.cfg.eval_every == 0
        return self._messages(server_round, evaluate, MessageType.TRAIN, grid, dict(config))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each reply for the next round, count and record; aggregate metrics only."""
        new_out: dict = {}
        failed: list[int] = []
        train_losses = []
        # node order, not arrival order: sums (consensus distance, mean loss) in a fixed order
        for reply in sorted(replies, key=lambda r: self.pid_of[r.metadata.src_node_id]):
            pid = self.pid_of[reply.metadata.src_node_id]
            if reply.has_error():
                self._node_failed(pid, server_round, reply)  # counts as dropped for this round
                failed.append(pid)
                continue
            m = reply.content.metric_records["metrics"]
            self._record_evaluation(server_round, pid, reply)
            self._collect(server_round, pid, reply, int(m["payload_bytes"]), new_out)
            self.rec.update(server_round, pid, train_loss=m["train_loss"])
            train_losses.append(float(m["train_loss"]))
        self._finish_evaluation()
        self._stop_if_every_node_failed(server_round, failed)
        self.last_out = new_out
        for p in self.nodes:  # dropped and failed nodes too: nothing trained or sent
            self.rec.update(server_round, p, sim_time=self._sim_time(server_round),
                            **self.traffic.record(p))  # fmt: skip
        self._round_faults["failed"] = sorted(failed)
        # Timings live here, not in metrics.jsonl, so that metrics.jsonl is deterministic.
        self.rec.close_round(
            {
                "round": server_round,
                "sim_time": self._sim_time(server_round),
                "wall_s": self.elapsed(),
                "faults": self._round_faults,
            }
        )
        self.rec.close_through(server_round - 1)  # evaluated and delivered: final
        metrics = {"train_loss": float(np.mean(train_losses))} if train_losses else {}
        accs = self.rec.round_accuracies(server_round - 1)
        if accs:
            metrics.update(accuracy_mean=float(np.mean(accs)), accuracy_min=float(np.min(accs)))
        return None, MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nothing until the last round; then deliver its messages for a final evaluation."""
        if server_round < self.cfg.num_rounds:
            return []
        extra = dict(config)
        if self.out is not None:  # nodes save their final model there (for `sim plot`)
            extra["final-dir"] = str(self.out / FINAL_DIR)
        return self._messages(server_round + 1, True, MessageType.EVALUATE, grid, extra)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record every node's final accuracy; their mean and worst."""
        replies = sorted(replies, key=lambda r: self.pid_of[r.metadata.src_node_id])
        if not replies:
            return None
        for reply in replies:
            pid = self.pid_of[reply.metadata.src_node_id]
            if reply.has_error():
                self._node_failed(pid, server_round + 1, reply)
                continue
            self._record_evaluation(server_round + 1, pid, reply)
        self._finish_evaluation()
        self.rec.complete_pending(None)  # the last round's record, even if nobody evaluated
        self.rec.close_through(server_round)
        accs = self.rec.round_accuracies(server_round)
        if not accs:
            return None
        return MetricRecord({"accuracy_mean": float(np.mean(accs)),
                             "accuracy_min": float(np.min(accs))})  # fmt: skip

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        resume: Checkpoint | None = None,
    ) -> Result:
        """Run the rounds (from a checkpoint with ``resume``), then the final evaluation.

        Flower's loop, with two differences a gossip run needs: it can continue a checkpointed
        run, and evaluation happens inside each round's train message (on the combined
        models, every ``eval-every`` rounds) and once after the last round.
        ``num_rounds`` defaults to the config's; ``evaluate_fn`` (a server-side evaluation of a
        global model) has nothing to evaluate here and is refused.
        """
        if evaluate_fn is not None:
            raise ValueError("GossipStrategy has no global model for evaluate_fn to evaluate")
        if num_rounds is not None and num_rounds != self.cfg.num_rounds:
            raise ValueError(f"num_rounds={num_rounds}, but the config says "
                             f"num-rounds={self.cfg.num_rounds}")  # fmt: skip
        arrays = initial_arrays if initial_arrays is not None else ArrayRecord()
        train_config = train_config or ConfigRecord()
        self.summary()
        self.connect(grid)
        first = self._restore(grid, resume) if resume is not None else 1
        result = Result()
        for rnd in range(first, self.cfg.num_rounds + 1):
            replies = grid.send_and_receive(self.configure_train(rnd, arrays, train_config, grid),
                                            timeout=timeout)  # fmt: skip
            _, metrics = self.aggregate_train(rnd, replies)
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            if self.cfg.checkpoint_every and rnd % self.cfg.checkpoint_every == 0:
                self.checkpoint(grid, rnd)
            self._log_round(rnd)
        last = self.cfg.num_rounds
        messages = self.configure_evaluate(last, arrays, evaluate_config or ConfigRecord(), grid)
        final = self.aggregate_evaluate(last, grid.send_and_receive(messages, timeout=timeout))
        if final is not None:
            result.evaluate_metrics_clientapp[last] = final
        return result

    # ---- the relay's own work ----------------------------------------------------------------

    def connect(self, grid: Grid) -> None:
        """Find which Flower node is which graph node; configure them for this experiment."""
        self.node_ids = discover_nodes(grid, self.nodes)
        self.pid_of = {nid: pid for pid, nid in self.node_ids.items()}
        if self.configure_nodes:
            experiment = {"experiment": uuid.uuid4().hex, **self.cfg.to_run_config()}
            errors = ask_every_node(grid, self.node_ids, "configure", experiment)
            if errors:
                raise RuntimeError(f"could not configure the nodes: {'; '.join(errors)}")

    def _sim_time(self, rnd: int) -> float | None:
        """Simulated seconds at the end of round ``rnd``: every round waits for the slowest."""
        return None if self.round_time is None else rnd * self.round_time

    def elapsed(self) -> float:
        """Seconds since the run started (resumed runs include the interrupted part)."""
        return time.perf_counter() - self.started

    def checkpoint(self, grid: Grid, rnd: int) -> None:
        """Nodes write their state, then the relay its own, then the manifest commits."""
        if self.out is None:
            return
        folder = round_dir(self.out, rnd)
        errors = ask_every_node(grid, self.node_ids, "checkpoint", {"path": str(folder)})
        if errors:
            log(WARNING, "checkpoint after round %d skipped: %s", rnd, "; ".join(errors))
            return
        self._write_relay_state(folder)
        commit(self.out, rnd, self.cfg.to_run_config())

    def _relay_state(self) -> dict:
        """What the relay knows besides the messages in transit: records, bytes, fault counts."""
        return {
            "recorder": self.rec.state(),
            "traffic": self.traffic.to_dict(),
            "faults": self.faults.to_dict(),
            "elapsed_s": self.elapsed(),
        }

    def _write_relay_state(self, folder: Path) -> None:
        write_relay_state(folder, self._relay_state(),
                          {j: _arrays(m) for j, m in self.last_out.items()})  # fmt: skip

    def _restore(self, grid: Grid, resumed: Checkpoint) -> int:
        """Continue from a checkpoint: the nodes restore theirs; returns the next round."""
        errors = ask_every_node(grid, self.node_ids, "restore", {"path": str(resumed.folder)})
        if errors:
            raise RuntimeError(f"could not restore {resumed.folder}: {'; '.join(errors)}")
        state = resumed.relay
        self.rec.restore(state["recorder"])
        self.traffic = Traffic.from_dict(state["traffic"])
        self.faults = FaultLog.from_dict(state["faults"])
        self._restore_in_transit(resumed)
        self.started = time.perf_counter() - state["elapsed_s"]
        log(INFO, "resuming after round %d from %s", resumed.round, resumed.folder)
        return resumed.round + 1

    def _restore_in_transit(self, resumed: Checkpoint) -> None:
        """The messages the checkpoint still had to deliver."""
        self.last_out = {j: _records(m) for j, m in resumed.last_out.items()}

    def _messages(self, rnd: int, evaluate: bool, kind: str, grid: Grid, extra: dict) -> list:
        """Round ``rnd``'s delivery of round ``rnd - 1``'s messages, as Flower messages."""
        if not self.node_ids:  # configure_* called without start(): find the nodes now
            self.node_ids = discover_nodes(grid, self.nodes)
            self.pid_of = {nid: pid for pid, nid in self.node_ids.items()}
        delivery = self.network.deliver(rnd, self.last_out)
        self.faults.planned(delivery.plan)
        self.faults.link_drops += delivery.lost
        self._round_faults = {"dropped": sorted(delivery.plan.dropped),
                              "stragglers": sorted(delivery.plan.stragglers),
                              "link_drops": delivery.lost}  # fmt: skip
        msgs = []
        for p, inbox in delivery.inboxes.items():
            self._count_delivery(rnd, p, inbox)
            fraction = self.cfg.straggler_fraction if p in delivery.plan.stragglers else 1.0
            msgs.append(round_message(rnd, evaluate, inbox, self.node_ids[p], kind,
                                      {**extra, "steps-fraction": fraction}))  # fmt: skip
        self._meter = ConsensusMeter()
        return msgs

    def _record_evaluation(self, rnd: int, pid: int, reply: Message) -> None:
        """A node evaluated its combined model (after ``rnd - 1`` rounds): record it."""
        m = reply.content.metric_records["metrics"]
        if "accuracy" not in m:
            return
        self.rec.update(rnd - 1, pid, accuracy=m["accuracy"], loss=m["loss"],
                        unseen_accuracy=m.get("unseen_accuracy"),
                        domain_accuracy=m.get("domain_accuracy"))  # fmt: skip
        if MONITOR in reply.content.array_records:
            self._meter.add(from_record(reply.content.array_records[MONITOR]))

    def _finish_evaluation(self) -> None:
        """The waiting round record gets the consensus distance of the models just evaluated."""
        if self._meter.count:
            self.rec.complete_pending(self._meter.by_group())
            self._meter = ConsensusMeter()

    def _collect(self, rnd: int, pid: int, reply: Message, payload: int, new_out: dict) -> None:
        """Keep what node ``pid`` sends for the next round, and count the bytes it sends."""
        if self.network.algo.per_receiver_messages:
            outbox = unpack_outbox(reply.content)
            if outbox:
                new_out[pid] = outbox
                self.traffic.count_sent(pid, payload, 1)  # ``payload``: all of its messages
            return
        record = reply.content.array_records["out"]
        if len(record):
            new_out[pid] = record
            receivers = 1 if self.network.server_average else len(
                self.network.receivers(pid, rnd))  # fmt: skip
            self.traffic.count_sent(pid, payload, receivers)

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

    def _stop_if_every_node_failed(self, rnd: int, failed: list[int]) -> None:
        """A round in which every node's ClientApp raised is a broken run, not a faulty one."""
        took_part = [p for p in self.nodes if p not in self._round_faults.get("dropped", [])]
        injected = self.cfg.fail_every and rnd % self.cfg.fail_every == 0
        if failed and len(failed) == len(took_part) and not injected:
            raise RuntimeError(
                f"every node's ClientApp raised in round {rnd} (first error: "
                f"{self.faults.first_error(failed[0])}): the run stops rather than go on "
                "training nothing"
            )

    def _log_round(self, rnd: int) -> None:
        """Every round: where the run is, and how long it should still take."""
        line = self.progress.tick(rnd, self.elapsed())
        accs = self.rec.round_accuracies(rnd - 1)
        if accs:  # evaluation happens every eval-every rounds, on the combined models
            line += (f"  mean node accuracy after round {rnd - 1}: {100 * np.mean(accs):.1f}% "
                     f"(worst {100 * np.min(accs):.1f}%)")  # fmt: skip
        log(INFO, "%s", line)


def _arrays(message: ArrayRecord | dict[int, ArrayRecord]) -> dict:
    """A relayed message as arrays (a per-receiver one: {receiver: arrays})."""
    if isinstance(message, ArrayRecord):
        return from_record(message)
    return {k: from_record(m) for k, m in message.items()}


def _records(message: dict) -> ArrayRecord | dict[int, ArrayRecord]:
    """Inverse of ``_arrays``."""
    if message and all(isinstance(k, int) for k in message):
        return {k: to_record(m) for k, m in message.items()}
    return to_record(message)
