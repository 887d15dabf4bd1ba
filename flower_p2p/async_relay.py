"""``mode=async``: the relay runs every node at its own pace on the simulated clock.

No node waits for another. The whole schedule follows from the clock (``flower_p2p.clock``):
which call each node gets when, and which message each call combines. Async DSGD: node i's k-th
activation starts when its (k-1)-th ends and combines the latest message each in-neighbour had
delivered by then. AD-PSGD: at the end of each activation a node averages with one neighbour,
two calls at the same simulated time (``PairwiseSchedule``). The relay sends the calls to Flower
in waves of those whose inputs are computed (``Schedule.waves``), each wave one
``send_and_receive``, which keeps the engine's actors busy and makes the results independent of
how long anything really took.

What the ClientApp receives is the same ``train`` message as in sync mode (its ``in:<j>``
records, a round config), plus ``activation`` (the node's call count, which seeds its minibatch
order) and, for AD-PSGD, ``event`` and ``train``. Its ``round`` is the sync round its start
falls in, which sets the learning-rate schedule. The relay still only relays: it keeps each
message until no later call combines it (``forget_after``).

``metrics.jsonl`` has a record per node at every multiple of the sync round time, like a sync
run: the model each node held then (evaluated every ``eval-every``), cumulative bytes, the mean
training loss of the activations that ended in the interval, how many there were, and the
staleness of the messages combined: age (simulated seconds since sent or made) and lag (newer
messages of that sender already sent but still in flight).

Faults (``faults.ActivationFaults``: dropouts per activation, lost copies per message,
``fail-every``'s failing calls) are part of the schedule, so the relay knows before a call which
messages exist; ``network.jsonl`` lists each record's. A failure the schedule did not plan
stops the run. Checkpoints (``checkpoint-every``): the waves are cut at every k-th record time,
and after the last call that starts by it the nodes write their state and the relay its own
(open records, the messages some later call combines, models evaluated for a later record).
A resumed run skips the calls the checkpoint holds and writes the same files. Nothing the
relay sums depends on how the calls fall into waves, so checkpointing changes no number.
"""

from __future__ import annotations

import math
from collections import defaultdict
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy.result import Result

from flower_p2p.checkpoint import Checkpoint, read_npz, write_npz, write_relay_state
from flower_p2p.clock import Activation, Plan, Schedule, schedule_for, started_by
from flower_p2p.config import ExperimentConfig
from flower_p2p.consensus import ConsensusMeter
from flower_p2p.gossip_strategy import GossipStrategy, round_message
from flower_p2p.results import FINAL_DIR
from flower_p2p.wire import MONITOR, from_record, payload_bytes, to_record

_EPS = 1e-9
# In a checkpoint: each node's evaluated model for the evaluation points still open.
ASYNC_MONITORS = "relay-monitors.npz"


class AsyncGossipStrategy(GossipStrategy):
    """Neighbour-only relaying without rounds: activations ordered by simulated time."""

    def __init__(
        self, cfg: ExperimentConfig, out: Path | None = None, configure_nodes: bool = False
    ) -> None:
        super().__init__(cfg, out, configure_nodes)  # builds self.clock and self.round_time
        clock = self.clock
        assert clock is not None and self.round_time is not None  # async needs a network
        self.eval_rounds = sorted({q for q in range(cfg.num_rounds) if q % cfg.eval_every == 0}
                                  | {cfg.num_rounds})  # fmt: skip
        self.schedule = schedule_for(
            cfg, clock, cfg.num_rounds * self.round_time,
            [q * self.round_time for q in self.eval_rounds],
        )  # fmt: skip
        # what each sender sent, kept while some receiver may still combine it
        self.sent: dict[int, dict[int, ArrayRecord]] = defaultdict(dict)
        # per evaluation point: each node's evaluated model, for the consensus distance (added
        # in node order when the record closes, so that it does not depend on the waves)
        self.monitors: dict[int, dict[int, dict]] = defaultdict(dict)
        # per (record round, node): sums the record's interval gathers as activations complete
        self.intervals: dict[tuple[int, int], dict] = {}
        self.sent_bytes = defaultdict(int)  # (record round, node) -> bytes put on the network
        self.received_bytes = defaultdict(int)
        self.next_close = 0
        # the faults of each record's interval, as the schedule placed them
        self.interval_faults: dict[int, dict] = defaultdict(
            lambda: {"dropped": [], "failed": [], "stragglers": [], "link_drops": 0}
        )
        for act in self.schedule.dropped:
            self.interval_faults[self._fault_record(act.start)]["dropped"].append(act.node)
        for t, _ in self.schedule.lost:
            self.interval_faults[self._fault_record(t)]["link_drops"] += 1
        for plan in self.schedule.plans.values():
            if plan.fails:
                act = plan.activation
                self.interval_faults[self._fault_record(act.start)]["failed"].append(act.node)

    def record_of(self, t: float) -> int:
        """The record (multiple of the round time) whose interval ((q-1)T, qT] holds time t."""
        return min(max(math.ceil(t / self.round_time - _EPS), 0), self.cfg.num_rounds)

    def _fault_record(self, t: float) -> int:
        """The network record that lists a fault at time t (the first holds time 0 too)."""
        return max(self.record_of(t), 1)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
        resume: Checkpoint | None = None,
    ) -> Result:
        """Run every activation in simulated-time order, then the final evaluation."""
        if evaluate_fn is not None:
            raise ValueError("GossipStrategy has no global model for evaluate_fn to evaluate")
        self.summary()
        log(INFO, "\t    mode=async: %d node calls on the simulated clock (%.4g s; a sync "
            "round: %.4g s)", len(self.schedule.plans), self.schedule.horizon,
            self.round_time)  # fmt: skip
        self.connect(grid)
        extra = dict(train_config or {})
        cuts = self.checkpoint_times()
        if resume is not None:
            self._restore(grid, resume)
            cuts[resume.round] = resume.round * self.round_time
        waves = self.schedule.waves(sorted(cuts.values()))
        forget = forget_after(self.schedule, waves)
        checkpoint_after = checkpoints_after(waves, cuts)
        for w, wave in enumerate(waves):
            if resume is not None and all(started_by(p, cuts[resume.round]) for p in wave):
                continue  # ran before the checkpoint
            messages = [self._activation_message(plan, extra) for plan in wave]
            replies = {self.pid_of[r.metadata.src_node_id]: r
                       for r in grid.send_and_receive(messages, timeout=timeout)}  # fmt: skip
            for plan in wave:
                self._collect_activation(plan, replies.get(plan.activation.node))
            upcoming = waves[w + 1] if w + 1 < len(waves) else []
            self._close_records_before(min((p.activation.start for p in upcoming),
                                           default=self.schedule.horizon))  # fmt: skip
            for j, k in forget.get(w, ()):  # no call left combines these messages
                del self.sent[j][k]
            if w in checkpoint_after:
                self.checkpoint(grid, checkpoint_after[w])
        result = Result()
        final = self._final_evaluation(grid, evaluate_config or ConfigRecord(), timeout)
        if final is not None:
            result.evaluate_metrics_clientapp[self.cfg.num_rounds] = final
        return result

    # ---- one activation ----------------------------------------------------------------------

    def _activation_message(self, plan: Plan, extra: dict) -> Message:
        """The activation's ``train`` message: the round its start falls in sets its lr."""
        act = plan.activation
        inbox = {j: self.sent[j][k] for j, k in plan.inbox.items()}
        rnd = min(self.record_of(act.start) + 1, self.cfg.num_rounds)
        config = {**extra, "activation": act.index}
        if plan.event is not None:
            config["event"] = plan.event
        if not plan.train:
            config["train"] = False
        return round_message(rnd, bool(plan.evals), inbox, self.node_ids[act.node],
                             MessageType.TRAIN, config)  # fmt: skip

    def _collect_activation(self, plan: Plan, reply: Message | None) -> None:
        act = plan.activation
        if (
            plan.fails
            and reply is not None
            and reply.has_error()
            and (reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        ):
            # fail-every: it sends nothing, and its model stays as it was (the schedule knew)
            self.faults.error(act.node, self._fault_record(act.start), reply.error.reason)
            return
        if reply is None or reply.has_error() or plan.fails:
            reason = ("no reply" if reply is None else reply.error.reason if reply.has_error()
                      else "it replied, but fail-every says this activation raises")  # fmt: skip
            # The schedule fixed who hears what before anything trained; a failure it did not
            # plan (other than fail-every's) would change it, so the run stops.
            raise RuntimeError(f"node {act.node} failed in its activation {act.index} "
                               f"(simulated time {act.start:.4g} s): {reason}"
                               + ("; continue with resume=true" if self.cfg.checkpoint_every
                                  else ""))  # fmt: skip
        m = reply.content.metric_records["metrics"]
        for q in plan.evals:
            self._record_evaluation_at(self.eval_rounds[q], act.node, reply)
        record = reply.content.array_records["out"]
        self.sent[act.node][act.index] = record
        if plan.broadcast:  # async DSGD: sent to every out-neighbour when the activation ends
            self._count_broadcast(act, int(m["payload_bytes"]))
        else:  # AD-PSGD: models travel in exchanges; a pair's two calls count one each way
            at = self.record_of(act.start)
            for j, k, receiver, arrived in plan.transfers:
                payload = payload_bytes(self.sent[j][k])
                self.traffic.count_sent(j, payload, 1)
                self.sent_bytes[(at, j)] += payload
                if arrived:
                    self.traffic.count_delivery(receiver, [payload])
                    self.received_bytes[(at, receiver)] += payload
        interval = self.intervals.setdefault(
            (self.record_of(act.end if plan.train else act.start), act.node),
            {"losses": [], "ages": [], "lags": []},
        )
        if plan.train:
            interval["losses"].append(float(m["train_loss"]))
        interval["ages"].extend(plan.age[j] for j in sorted(plan.age))
        interval["lags"].extend(plan.lag[j] for j in sorted(plan.lag))

    def _count_broadcast(self, act: Activation, payload: int) -> None:
        """``act`` sent ``payload`` bytes to each out-neighbour as it ended; each gets it later."""
        node, at = act.node, act.end
        receivers = self.clock.out_neighbours[node]
        self.traffic.count_sent(node, payload, len(receivers))
        self.sent_bytes[(self.record_of(at), node)] += payload * len(receivers)
        for i in receivers:
            arrives = at + self.clock.latency[(node, i)]
            if self.schedule.faults.lost(node, i, act.index):
                continue
            if arrives <= self.schedule.horizon + _EPS:  # after the run: never received
                self.traffic.count_delivery(i, [payload])
                self.received_bytes[(self.record_of(arrives), i)] += payload

    def _record_evaluation_at(self, q: int, pid: int, reply: Message) -> None:
        m = reply.content.metric_records["metrics"]
        self.rec.update(q, pid, accuracy=m["accuracy"], loss=m["loss"],
                        unseen_accuracy=m.get("unseen_accuracy"),
                        domain_accuracy=m.get("domain_accuracy"))  # fmt: skip
        if MONITOR in reply.content.array_records:
            self.monitors[q][pid] = from_record(reply.content.array_records[MONITOR])

    # ---- records -----------------------------------------------------------------------------

    def _close_records_before(self, t: float) -> None:
        """Append every record whose time is before ``t``: nothing that starts later changes it."""
        while self.next_close < self.cfg.num_rounds and (
            self.next_close * self.round_time < t - _EPS * max(1.0, t)
        ):
            self._close(self.next_close)
            self.next_close += 1

    def _close(self, q: int) -> None:
        """Record ``q``: simulated time q * round time, cumulative bytes, the interval's figures."""
        for p in self.nodes:
            interval = self.intervals.pop((q, p), None)
            values: dict = {"sim_time": q * self.round_time, "activations": 0,
                            "staleness_mean_s": None, "staleness_max_s": None,
                            "staleness_max_lag": None}  # fmt: skip
            if interval is not None:
                values.update(
                    train_loss=float(np.mean(interval["losses"])) if interval["losses"] else None,
                    activations=len(interval["losses"]),
                    staleness_mean_s=float(np.mean(interval["ages"])) if interval["ages"] else None,
                    staleness_max_s=float(np.max(interval["ages"])) if interval["ages"] else None,
                    staleness_max_lag=int(np.max(interval["lags"])) if interval["lags"] else None,
                )  # fmt: skip
            self._cumulative_bytes(q, p)
            self.rec.update(q, p, **values)
        meter = ConsensusMeter()
        for _, model in sorted(self.monitors.pop(q, {}).items()):
            meter.add(model)
        if q:  # like sync, network.jsonl starts at round 1 (every model starts the same)
            faults = self.interval_faults.pop(q, None) or self.interval_faults.default_factory()
            self.faults.node_dropouts += len(faults["dropped"])
            self.faults.link_drops += faults["link_drops"]
            faults.update(dropped=sorted(set(faults["dropped"])),
                          failed=sorted(set(faults["failed"])))  # fmt: skip
            self.rec.close_round({"round": q, "sim_time": q * self.round_time,
                                  "wall_s": self.elapsed(), "faults": faults})  # fmt: skip
            self.rec.complete_pending(meter.by_group() if meter.count else None)
        self.rec.close_through(q)
        if q:
            line = self.progress.tick(q, self.elapsed())
            accs = self.rec.round_accuracies(q)
            if accs:
                mean, worst = 100 * np.mean(accs), 100 * np.min(accs)
                line += (f"  mean node accuracy at simulated time {q * self.round_time:.4g} s: "
                         f"{mean:.1f}% (worst {worst:.1f}%)")  # fmt: skip
            log(INFO, "%s", line)

    def _cumulative_bytes(self, q: int, p: int) -> None:
        prev = self.rec.closed.get(p) if q else None
        sent = (prev["bytes_sent"] if prev else 0) + self.sent_bytes.pop((q, p), 0)
        received = (prev["bytes_received"] if prev else 0) + self.received_bytes.pop((q, p), 0)
        self.rec.update(q, p, bytes_sent=sent, bytes_received=received, network_bytes=sent)

    # ---- checkpoints -------------------------------------------------------------------------

    def checkpoint_times(self) -> dict[int, float]:
        """Record number -> simulated time of each checkpoint (every ``checkpoint-every``).

        A checkpoint at record q holds every call that starts by q * round time, and nothing
        after: the waves are cut there (``Schedule.waves``).
        """
        every = self.cfg.checkpoint_every
        if not every or self.out is None:
            return {}
        return {q: q * self.round_time for q in range(every, self.cfg.num_rounds + 1, every)}

    def _write_relay_state(self, folder: Path) -> None:
        """The records still open, and the messages and evaluated models some call still needs."""
        state = self._relay_state()
        state["async"] = {
            "next_close": self.next_close,
            "intervals": [[q, p, v] for (q, p), v in sorted(self.intervals.items())],
            "sent_bytes": [[q, p, b] for (q, p), b in sorted(self.sent_bytes.items())],
            "received_bytes": [[q, p, b] for (q, p), b in sorted(self.received_bytes.items())],
        }
        monitors = {f"{q}/{p}/{k}": v for q, models in self.monitors.items()
                    for p, model in models.items() for k, v in model.items()}  # fmt: skip
        write_npz(folder / ASYNC_MONITORS, monitors)
        # in transit: sender j's message number k, stored as a message to "receiver" k
        in_transit = {j: {k: from_record(m) for k, m in sent.items()}
                      for j, sent in self.sent.items() if sent}  # fmt: skip
        write_relay_state(folder, state, in_transit)

    def _restore_in_transit(self, resumed: Checkpoint) -> None:
        """Everything ``_write_relay_state`` wrote besides the parent relay's state."""
        state = resumed.relay["async"]
        self.next_close = int(state["next_close"])
        self.intervals = {(q, p): v for q, p, v in state["intervals"]}
        self.sent_bytes = defaultdict(int, {(q, p): b for q, p, b in state["sent_bytes"]})
        self.received_bytes = defaultdict(int, {(q, p): b for q, p, b in state["received_bytes"]})
        self.sent = defaultdict(dict)
        for j, messages in resumed.last_out.items():
            for k, arrays in messages.items():
                self.sent[j][k] = to_record(arrays)
        self.monitors = defaultdict(dict)
        for key, value in read_npz(resumed.folder / ASYNC_MONITORS).items():
            q, p, name = key.split("/", 2)
            self.monitors[int(q)].setdefault(int(p), {})[name] = value

    # ---- the end -----------------------------------------------------------------------------

    def _final_evaluation(self, grid: Grid, config: ConfigRecord, timeout: float):
        last = self.cfg.num_rounds
        extra = dict(config)
        if self.out is not None:
            extra["final-dir"] = str(self.out / FINAL_DIR)
        messages = []
        for p in self.nodes:
            inbox = {j: self.sent[j][k] for j, k in self.schedule.final_inbox(p).items()}
            config = {**extra, "activation": self.schedule.calls[p] + 1}
            if self.schedule.final_event is not None:
                config["event"] = self.schedule.final_event
            messages.append(round_message(last + 1, True, inbox, self.node_ids[p],
                                          MessageType.EVALUATE, config))  # fmt: skip
        replies = grid.send_and_receive(messages, timeout=timeout)
        # in node order, not arrival order: the consensus distance sums in a fixed order
        for reply in sorted(replies, key=lambda r: self.pid_of[r.metadata.src_node_id]):
            pid = self.pid_of[reply.metadata.src_node_id]
            if reply.has_error():
                raise RuntimeError(f"node {pid} failed in the final evaluation: "
                                   f"{reply.error.reason}")  # fmt: skip
            self._record_evaluation_at(last, pid, reply)
        self._close(last)
        accs = self.rec.round_accuracies(last)
        if not accs:
            return None
        return MetricRecord({"accuracy_mean": float(np.mean(accs)),
                             "accuracy_min": float(np.min(accs))})  # fmt: skip


def checkpoints_after(waves: list[list[Plan]], cuts: dict[int, float]) -> dict[int, int]:
    """Wave index -> the record to checkpoint after it: the last wave of calls by that time.

    Two checkpoint times with no call between them share a wave; the later one is taken.
    """
    after: dict[int, int] = {}
    for q, t in sorted(cuts.items()):
        last = max((w for w, wave in enumerate(waves)
                    if all(started_by(p, t) for p in wave)), default=None)  # fmt: skip
        if last is not None:
            after[last] = q
    return after


def forget_after(schedule: Schedule, waves: list[list[Plan]]) -> dict[int, list[tuple[int, int]]]:
    """For each wave, the messages (sender, number) no later call combines: drop them after it.

    Messages the final evaluation combines are kept to the end. The relay thus holds a few
    messages per link, not every message of the run.
    """
    made: dict[tuple[int, int], int] = {}
    last_use: dict[tuple[int, int], int] = {}
    for w, wave in enumerate(waves):
        for plan in wave:
            if not plan.fails:  # a call that raised made no message
                made[(plan.activation.node, plan.activation.index)] = w
            for ref in plan.needs():
                last_use[ref] = w
    kept = {(j, k) for p in range(schedule.clock.num_nodes)
            for j, k in schedule.final_inbox(p).items()}  # fmt: skip
    forget: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for key, w in made.items():
        if key not in kept:
            forget[max(w, last_use.get(key, w))].append(key)
    return forget
