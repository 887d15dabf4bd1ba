"""``GossipStrategy`` is a Flower strategy another app can adopt, and what it relays is exact.

A minimal second app (``minimal_gossip_app``: its own least-squares model and ClientApp, our
strategy) runs through Flower's simulation engine; every node's final model must equal what the
pure reference loop (``strategies.harness.run_gossip``) computes for the same algorithm, graph
and local step. RelaySum is used because it is the most demanding of the relay (a different
message to each tree neighbour).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import Strategy
from minimal_gossip_app import DIM, LR, gradient, local_step

from flower_p2p.config import ExperimentConfig
from flower_p2p.gossip_strategy import GossipStrategy
from flower_p2p.schedules import topology_at
from sim.engine import run_app
from strategies import create_strategy
from strategies.harness import run_gossip

N, ROUNDS = 6, 25


def test_it_is_a_flower_strategy():
    assert issubclass(GossipStrategy, Strategy)
    strategy = GossipStrategy(ExperimentConfig(num_nodes=4))
    arrays, metrics = strategy.aggregate_train(1, [])
    assert arrays is None  # it aggregates no arrays: there is no global model


# RelaySum: a different message to each tree neighbour; K-GT-grad: the app hands its corrected
# gradient back through the node-side API
@pytest.mark.parametrize("strategy", ["relay-sum", "k-gt-grad"])
def test_another_app_adopts_gossip_and_computes_the_reference(tmp_path, strategy):
    run_config = {"num-nodes": N, "num-rounds": ROUNDS, "strategy": strategy,
                  "topology": "ring", "eval-every": 1000, "out-dir": str(tmp_path)}  # fmt: skip
    cfg = ExperimentConfig.from_run_config(run_config)
    run_app(run_config, N, "minimal_gossip_app:server", "minimal_gossip_app:client")
    flower = [np.load(tmp_path / f"node-{i}.npy") for i in range(N)]

    def step(node: int, params: dict, rnd: int, gradient_correction: dict | None = None):
        if gradient_correction is None:
            return {"x": local_step(node, params["x"], N)}
        g = gradient(node, params["x"], N) + gradient_correction["x"]
        return {"x": params["x"] - LR * g}, {"x": g}

    kwargs = {"num_nodes": N} if strategy == "relay-sum" else {}
    reference = run_gossip(create_strategy(strategy, **kwargs),
                           lambda t: topology_at(cfg, t + 1).dense(), step,
                           {"x": np.zeros(DIM)}, ROUNDS)  # fmt: skip
    for got, want in zip(flower, reference, strict=True):
        np.testing.assert_allclose(got, want["x"], rtol=1e-12, atol=1e-12)
    assert np.ptp(np.stack(flower), axis=0).max() > 1e-6  # nodes still differ: not trivial


# ---- the strategy alone, against a fake Grid (no Ray): failures and what a node is sent -------


class FakeGrid:
    """Answers the strategy's queries with partition ids and its train messages with ``reply``."""

    def __init__(self, n: int, reply) -> None:
        self.n, self.reply, self.sent = n, reply, []

    def get_node_ids(self):
        return [100 + p for p in range(self.n)]

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        out = []
        for msg in messages:
            pid = msg.metadata.dst_node_id - 100
            if msg.metadata.message_type == MessageType.QUERY:
                info = ConfigRecord({"partition-id": pid, "num-partitions": self.n})
                out.append(Message(RecordDict({"node": info}), reply_to=msg))
            else:
                self.sent.append((pid, sorted(msg.content.array_records)))
                out.append(self.reply(pid, msg))
        return out


def _ok(pid, msg):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    out = ArrayRecord({"w": Array(np.full(2, float(pid)))})
    metrics = MetricRecord({"train_loss": 1.0, "payload_bytes": out.count_bytes()})
    return Message(RecordDict({"out": out, "metrics": metrics}), reply_to=msg)


def _raises(pid, msg):
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"boom {pid}"),
                   reply_to=msg)  # fmt: skip


def test_a_node_gets_its_in_neighbours_messages_only(task_identity):
    cfg = ExperimentConfig(num_nodes=5, num_rounds=3, eval_every=100)
    grid = FakeGrid(5, _ok)
    GossipStrategy(cfg).start(grid)
    by_round = [grid.sent[i : i + 5] for i in range(0, len(grid.sent), 5)]
    assert all(keys == [] for _, keys in by_round[0])  # round 1: nothing sent yet
    for received in by_round[1:]:  # a ring: i hears i - 1 and i + 1
        assert dict(received) == {p: sorted([f"in:{(p - 1) % 5}", f"in:{(p + 1) % 5}"])
                                  for p in range(5)}  # fmt: skip


def test_a_failing_node_counts_as_dropped_but_every_node_failing_stops_the_run(task_identity):
    cfg = ExperimentConfig(num_nodes=3, num_rounds=2, eval_every=100)
    one_fails = GossipStrategy(cfg)
    one_fails.start(FakeGrid(3, lambda p, m: _raises(p, m) if p == 1 else _ok(p, m)))
    assert one_fails.faults.failed_nodes == {1: 3}  # both rounds and the final evaluation
    with pytest.raises(RuntimeError, match="every node's ClientApp raised in round 1.*boom 0"):
        GossipStrategy(cfg).start(FakeGrid(3, _raises))


def test_a_gradient_correcting_algorithm_needs_the_apps_mean_gradient():
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from flower_p2p.gossip_node import GossipNode

    node = GossipNode(ExperimentConfig(num_nodes=4, strategy="k-gt-grad"))
    context = Context(run_id=1, node_id=101, node_config={"partition-id": 1, "num-partitions": 4},
                      state=RecordDict(), run_config={})  # fmt: skip
    msg = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=101,
                  message_type=MessageType.TRAIN)  # fmt: skip
    params = {"x": np.ones(DIM)}
    node.combine(msg, context, params)
    assert np.all(node.correction(context)["x"] == 0)  # the tracker starts at 0
    with pytest.raises(ValueError, match="mean_gradient"):
        node.reply(msg, context, params, {"train_loss": 0.0})
    reply = node.reply(msg, context, params, {"train_loss": 0.0},
                       mean_gradient={"x": np.full(DIM, 2.0)})  # fmt: skip
    sent = reply.content.array_records["out"]
    assert np.all(sent["d/x"].numpy() == 2.0) and np.all(sent["x/x"].numpy() == 1.0)
