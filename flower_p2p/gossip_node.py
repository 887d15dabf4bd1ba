"""The node side of gossip, for any Flower ClientApp that runs under ``GossipStrategy``.

A ClientApp with its own model adopts gossip in three calls::

    app.query()(identify)                        # tells the strategy which graph node it is

    @app.train()
    def train(msg, context):
        node = GossipNode(cfg)
        params = node.combine(msg, context, my_params)        # own model + neighbours' messages
        trained = my_training(params, correction=node.correction(context))
        return node.reply(msg, context, trained, {"train_loss": loss})

An algorithm that ``corrects_gradient`` (``k-gt-grad``) wants the correction added to every local
gradient before the optimizer step instead, and the mean corrected gradient back:
``node.reply(..., mean_gradient=...)``.

``cfg`` is the same ``ExperimentConfig`` the ServerApp gives its ``GossipStrategy`` (graph,
algorithm, seed). The algorithm's state (push-sum weights, CHOCO copies, trackers) lives in the
node's ``Context.state``; the app keeps its own model wherever it likes. The project's own
``client_app`` does the same through ``node.run_round``, with the ViT training in between.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from flower_p2p.config import ExperimentConfig
from flower_p2p.network import Network
from flower_p2p.node import algorithm_for, mixing_inputs
from flower_p2p.wire import from_record, pack_outbox, payload_bytes, to_record, unpack_inbox
from strategies import Params

STATE_ALGO = "gossip.algo"


def identify(msg: Message, context: Context) -> Message:
    """Reply to the strategy's ``query``: this SuperNode's partition id (its graph node)."""
    info = ConfigRecord({"partition-id": int(context.node_config["partition-id"]),
                         "num-partitions": int(context.node_config["num-partitions"])})  # fmt: skip
    return Message(RecordDict({"node": info}), reply_to=msg)


def ask_partition_ids(grid: Grid) -> dict[int, int]:
    """Partition-id -> Flower node id of every connected node that answers ``identify``."""
    queries = [Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY)
               for nid in grid.get_node_ids()]  # fmt: skip
    return {int(r.content.config_records["node"]["partition-id"]): r.metadata.src_node_id
            for r in grid.send_and_receive(queries) if not r.has_error()}  # fmt: skip


class GossipNode:
    """One node's gossip algorithm: combine with the inbox, and the reply that sends a message."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.algo = algorithm_for(cfg)

    def combine(
        self, msg: Message, context: Context, params: Params, step_size: float = 0.0
    ) -> Params:
        """Own ``params`` combined with the neighbours' messages the strategy delivered.

        ``step_size``: the sum of the learning rates of the local steps about to be taken (for
        K-GT and QG-DSGDm).
        """
        node = int(context.node_config["partition-id"])
        rnd = int(msg.content.config_records["config"]["round"])
        weights, kwargs = mixing_inputs(self.cfg, self.algo, node, rnd)
        if self.algo.needs_step_size:
            kwargs["step_size"] = step_size
        config = msg.content.config_records["config"]
        if self.algo.needs_event:  # mode=async (AD-PSGD): which call of the schedule this is
            kwargs["event"] = str(config["event"])
        state = context.state
        algo_state = (from_record(state.array_records[STATE_ALGO]) if STATE_ALGO in state
                      else self.algo.init_state(params))  # fmt: skip
        combined = self.algo.combine(params, algo_state, unpack_inbox(msg.content), weights,
                                     node, **kwargs)  # fmt: skip
        state[STATE_ALGO] = to_record(algo_state)
        return combined

    def correction(self, context: Context) -> Params | None:
        """The per-step correction u of the algorithm, if any.

        Applied as p <- p - lr * u after each optimizer step, or, where
        ``self.algo.corrects_gradient``, added to each gradient before the step.
        """
        if STATE_ALGO not in context.state:
            return None
        return self.algo.local_correction(from_record(context.state.array_records[STATE_ALGO]))

    def reply(
        self,
        msg: Message,
        context: Context,
        trained: Params,
        metrics: dict[str, float],
        mean_gradient: Params | None = None,
    ) -> Message:
        """The reply to a ``train`` message: what this node sends to its neighbours, and metrics.

        ``metrics`` with ``accuracy`` and ``loss`` (when the node evaluated) are recorded by the
        strategy; ``payload_bytes`` is added here. ``mean_gradient``: the mean corrected gradient
        of the local steps, required by an algorithm that ``corrects_gradient``.
        """
        node = int(context.node_config["partition-id"])
        rnd = int(msg.content.config_records["config"]["round"])
        algo_state = from_record(context.state.array_records[STATE_ALGO])
        if self.algo.corrects_gradient:
            if mean_gradient is None:
                raise ValueError(
                    f"strategy={self.algo.name} corrects gradients: add node.correction(context) "
                    "to every local gradient before the optimizer step and pass the mean "
                    "corrected gradient as reply(..., mean_gradient=...)"
                )
            self.algo.observe_gradient(algo_state, mean_gradient)
        content = RecordDict()
        if self.algo.per_receiver_messages:
            receivers = Network(self.cfg, self.algo).receivers(node, rnd)
            outbox = {k: to_record(m) for k, m in
                      self.algo.message(trained, algo_state, receivers).items()}  # fmt: skip
            pack_outbox(content, outbox)
            sent = sum(payload_bytes(m) for m in outbox.values())
        elif not bool(msg.content.config_records["config"].get("train", True)):
            # mode=async: a call that trains nothing (AD-PSGD's pair) sends the model it left
            content["out"] = out = to_record(self.algo.resting_message(algo_state))
            sent = payload_bytes(out)
        else:
            content["out"] = out = to_record(self.algo.message(trained, algo_state))
            sent = payload_bytes(out)
        context.state[STATE_ALGO] = to_record(algo_state)
        content["metrics"] = MetricRecord({"train_loss": float("nan"), **metrics,
                                           "payload_bytes": sent})  # fmt: skip
        return Message(content, reply_to=msg)
