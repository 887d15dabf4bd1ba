"""The async relay under faults and checkpoints, with in-process least-squares nodes (no Ray).

Each node is a small ClientApp-like function (``GossipNode`` around a gradient step on its own
quadratic), answered by a Grid that runs in the test's process, so a run takes a second and can
be cut anywhere. The relay itself is the real ``AsyncGossipStrategy``:

* a run that crashes mid-way and resumes from its last checkpoint, on fresh nodes that know
  nothing but what the checkpoint holds, writes the uninterrupted run's ``metrics.jsonl`` byte
  for byte (and its ``network.jsonl`` but for wall times);
* checkpointing changes no number (the waves are cut at checkpoint times);
* with dropouts, lost messages and failing calls, every call combines exactly the messages the
  schedule says, each from a neighbour.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from flower_p2p.async_relay import ASYNC_MONITORS, AsyncGossipStrategy
from flower_p2p.checkpoint import load_latest, node_file, read_npz, write_npz
from flower_p2p.config import ExperimentConfig
from flower_p2p.faults import FAIL_NODE
from flower_p2p.gossip_node import GossipNode
from flower_p2p.results import read_jsonl
from flower_p2p.wire import MONITOR, from_record, to_record, unpack_inbox

DIM, LR = 3, 0.3


class Crash(Exception):
    """The machine went down (the test's stand-in for a killed process)."""


def _digest(arrays: dict) -> str:
    return hashlib.sha256(b"".join(arrays[k].tobytes() for k in sorted(arrays))).hexdigest()


class LeastSquaresGrid:
    """Runs every message on in-process nodes: node p descends (x - b_p)^2 / 2 from 0.

    ``crash_after``: raise ``Crash`` instead of the train call with this number (1-based).
    ``log``: (node, activation, {sender: digest of the message combined}) of every train call,
    and ``replies[(node, activation)]``: the digest of what each call sent.
    """

    def __init__(self, cfg: ExperimentConfig, crash_after: int | None = None) -> None:
        self.cfg, self.crash_after, self.calls = cfg, crash_after, 0
        n = cfg.num_nodes
        self.contexts = {
            p: Context(1, 100 + p, {"partition-id": p, "num-partitions": n}, RecordDict(), {})
            for p in range(n)
        }
        self.log: list[tuple[int, int, dict[int, str]]] = []
        self.replies: dict[tuple[int, int], str] = {}

    def get_node_ids(self) -> list[int]:
        return [100 + p for p in self.contexts]

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        return [self._answer(msg) for msg in messages]

    def _answer(self, msg: Message) -> Message:
        pid = msg.metadata.dst_node_id - 100
        context, kind = self.contexts[pid], msg.metadata.message_type
        if kind == MessageType.QUERY:
            info = ConfigRecord({"partition-id": pid, "num-partitions": self.cfg.num_nodes})
            return Message(RecordDict({"node": info}), reply_to=msg)
        if kind.startswith(f"{MessageType.QUERY}."):  # checkpoint / restore, as the ClientApp
            path = node_file(Path(str(msg.content.config_records["config"]["path"])), pid)
            if kind.endswith("checkpoint"):
                write_npz(path, {f"{name}/{k}": v for name, rec in context.state.array_records
                                 .items() for k, v in from_record(rec).items()})  # fmt: skip
            else:
                state: dict[str, dict] = {}
                for key, value in read_npz(path).items():
                    name, k = key.split("/", 1)
                    state.setdefault(name, {})[k] = value
                context.state = RecordDict({n: to_record(a) for n, a in state.items()})
            return Message(RecordDict(), reply_to=msg)
        return self._step(pid, context, msg)

    def _step(self, pid: int, context: Context, msg: Message) -> Message:
        config = msg.content.config_records["config"]
        activation = int(config["activation"])
        if kind_is_train := msg.metadata.message_type == MessageType.TRAIN:
            self.calls += 1
            if self.crash_after is not None and self.calls >= self.crash_after:
                raise Crash(f"crashed before train call {self.calls}")
            inbox = {j: _digest(m) for j, m in unpack_inbox(msg.content).items()}
            self.log.append((pid, activation, inbox))
        if self.cfg.fail_every and pid == FAIL_NODE and activation % self.cfg.fail_every == 0:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason="injected"), reply_to=msg)  # fmt: skip
        node = GossipNode(self.cfg)
        own = (from_record(context.state.array_records["model"]) if "model" in context.state
               else {"x": np.zeros(DIM)})  # fmt: skip
        x = node.combine(msg, context, own)
        target = np.arange(DIM) + 2.0 * pid
        trains = kind_is_train and bool(config.get("train", True))
        trained = {"x": x["x"] - LR * (x["x"] - target)} if trains else x
        context.state["model"] = to_record(trained if trains else x)
        metrics = {"train_loss": float(np.sum((x["x"] - target) ** 2))}
        if bool(config["evaluate"]):
            err = float(np.linalg.norm(x["x"] - (np.arange(DIM) + self.cfg.num_nodes - 1.0)))
            metrics.update(accuracy=float(np.exp(-err)), loss=err)
        reply = node.reply(msg, context, trained, metrics)
        if bool(config["evaluate"]):
            reply.content[MONITOR] = to_record(x)
        if kind_is_train:
            self.replies[(pid, activation)] = _digest(from_record(reply.content["out"]))
        return reply


def _cfg(strategy: str, **change) -> ExperimentConfig:
    keys = dict(num_nodes=6, num_rounds=9, local_steps=2, eval_every=2, mode="async",
                strategy=strategy, topology="ring", slow_fraction=0.34, speed_spread=0.3,
                latency=0.5, latency_spread=0.5, node_dropout=0.15, link_drop=0.2,
                checkpoint_every=2)  # fmt: skip
    if strategy == "dsgd":
        keys["fail_every"] = 4
    cfg = ExperimentConfig(**{**keys, **change})
    cfg.validate()
    return cfg


def _run(cfg: ExperimentConfig, out: Path, grid: LeastSquaresGrid, resume=None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    AsyncGossipStrategy(cfg, out).start(grid, ArrayRecord(), resume=resume)
    return out


def _network(out: Path) -> list[dict]:
    records = read_jsonl(out / "network.jsonl")
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


# AD-PSGD on 3 nodes with 1 s links: an exchange outlasts a record (about 2 s), so a
# checkpoint can already hold models evaluated for a later record (found by trying seeds)
LONG_EXCHANGES = dict(num_nodes=3, num_rounds=6, local_steps=1, eval_every=1, slow_fraction=0.0,
                      speed_spread=0.3, latency=1.0, latency_spread=0.0, node_dropout=0.0,
                      link_drop=0.0, checkpoint_every=1)  # fmt: skip


@pytest.mark.parametrize(
    "strategy, change, crash_at",
    [("dsgd", {}, 0.6), ("ad-psgd", {}, 0.6), ("ad-psgd", LONG_EXCHANGES, 0.6)],
    ids=["dsgd", "ad-psgd", "ad-psgd-long-exchanges"],
)
def test_a_crashed_async_run_resumes_to_the_same_files(
    task_identity, tmp_path, strategy, change, crash_at
):
    cfg = _cfg(strategy, **change)
    grid = LeastSquaresGrid(cfg)
    whole = _run(cfg, tmp_path / "whole", grid)
    total = grid.calls
    metrics = read_jsonl(whole / "metrics.jsonl")
    assert [m["round"] for m in metrics[:: cfg.num_nodes]] == list(range(cfg.num_rounds + 1))
    faults = [r["faults"] for r in read_jsonl(whole / "network.jsonl")]
    if cfg.node_dropout:
        assert sum(len(f["dropped"]) for f in faults) > 0
        assert sum(f["link_drops"] for f in faults) > 0
    if cfg.fail_every:
        assert any(f["failed"] == [FAIL_NODE] for f in faults)
    # without checkpoints, the waves are cut nowhere: still the same numbers
    plain = _run(cfg.replace(checkpoint_every=0), tmp_path / "plain", LeastSquaresGrid(cfg))
    assert (plain / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    assert _network(plain) == _network(whole)

    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        _run(cfg, out, LeastSquaresGrid(cfg, crash_after=int(total * crash_at)))
    checkpoint = load_latest(out, cfg.to_run_config())
    assert 2 <= checkpoint.round < cfg.num_rounds  # a checkpoint from the middle of the run
    # evaluations already made for a later record travel in the checkpoint too
    pending = read_npz(checkpoint.folder / ASYNC_MONITORS)
    assert bool(pending) == (change is LONG_EXCHANGES)
    fresh = LeastSquaresGrid(cfg)  # new nodes: all they know comes from the checkpoint
    _run(cfg, out, fresh, resume=checkpoint)
    assert 0 < fresh.calls < total
    assert (out / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    assert _network(out) == _network(whole)


@pytest.mark.parametrize("strategy", ["dsgd", "ad-psgd"])
def test_with_faults_every_call_combines_exactly_what_the_schedule_delivered(
    task_identity, tmp_path, strategy
):
    cfg = _cfg(strategy, checkpoint_every=0)
    grid = LeastSquaresGrid(cfg)
    relay = AsyncGossipStrategy(cfg, tmp_path)
    relay.start(grid, ArrayRecord())
    sched = relay.schedule
    assert sorted((i, k) for i, k, _ in grid.log) == sorted(sched.plans)
    for i, k, inbox in grid.log:
        plan = sched.plans[(i, k)]
        assert set(inbox) == set(plan.inbox) <= set(sched.clock.in_neighbours[i])
        for j, digest in inbox.items():
            assert digest == grid.replies[(j, plan.inbox[j])]
    failed = [key for key, p in sched.plans.items() if p.fails]
    assert bool(failed) == (strategy == "dsgd")
    assert not set(failed) & set(grid.replies)  # a failed call sent nothing
    assert relay.faults.client_errors == len(failed)
    assert relay.faults.node_dropouts == len(sched.dropped) > 0
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    final = [m["loss"] for m in metrics if m["round"] == cfg.num_rounds]
    # distance to the network's optimum: gossip pulls every node well past its own target's
    own = [np.linalg.norm(np.full(DIM, 2.0 * p - (cfg.num_nodes - 1))) for p in range(6)]
    assert len(final) == cfg.num_nodes and np.mean(final) < 0.5 * np.mean(own)
