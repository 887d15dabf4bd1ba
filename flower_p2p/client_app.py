"""ClientApp: one gossip node. All combining of models happens here, never at the ServerApp."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_p2p.checkpoint import node_file, read_node_state, write_node_state
from flower_p2p.config import ExperimentConfig
from flower_p2p.gossip_node import identify
from flower_p2p.hosting import host_nodes
from flower_p2p.node import RoundResult, algorithm_for, mixing_inputs, node_runtime, run_round
from flower_p2p.results import node_params_path, write_params
from flower_p2p.wire import (
    MONITOR,
    from_record,
    pack_outbox,
    payload_bytes,
    to_record,
    unpack_inbox,
)

# host_nodes: a SuperNode may host several graph nodes (nodes-per-supernode); every handler
# below then runs once per hosted node, with that node's own Context.
app = ClientApp(mods=[host_nodes])

# Keys of what a node keeps between rounds in its Context.state (never sent anywhere).
STATE_PARAMS, STATE_ALGO, STATE_OPTIM = "node.params", "node.algo", "node.optim"
# The experiment the relay configured this node for (see ``configure``).
STATE_CONFIG = "node.config"


def _partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


# Tell the relay which partition (graph node) this SuperNode is.
app.query()(identify)


@app.query("configure")
def configure(msg: Message, context: Context) -> Message:
    """The relay names the experiment this node now takes part in; a new one starts afresh.

    One Flower run can hold several experiments one after another (``GossipStrategy``'s
    ``configure_nodes``); each brings its run config and an id, and a node that moves on to a new
    experiment forgets the last one's model, optimizer and algorithm state.
    """
    config = dict(msg.content.config_records["config"])
    state = context.state
    old = dict(state.config_records[STATE_CONFIG]) if STATE_CONFIG in state else {}
    if old.get("experiment") != config["experiment"]:
        for key in (STATE_PARAMS, STATE_ALGO, STATE_OPTIM):
            state.pop(key, None)
        state[STATE_CONFIG] = ConfigRecord(config)
    return Message(RecordDict(), reply_to=msg)


def _config(context: Context) -> ExperimentConfig:
    """The experiment's config: the one the relay configured, else the Flower run's."""
    if STATE_CONFIG in context.state:
        stored = dict(context.state.config_records[STATE_CONFIG])
        stored.pop("experiment")
        return _parsed(stored)
    return _parsed(dict(context.run_config))


def _parsed(run_config: dict) -> ExperimentConfig:
    # Every message carries the same run config; parsing and validating it (timm's model
    # registry, the partition keys) cost a fifth of a head-only node's round at 128 nodes.
    # ExperimentConfig is frozen, so one parsed copy serves every node of the process.
    try:
        return _parsed_cached(tuple(sorted(run_config.items())))
    except TypeError:  # an unhashable value: parse it uncached, its error names the key
        return ExperimentConfig.from_run_config(run_config)


@lru_cache(maxsize=8)
def _parsed_cached(items: tuple) -> ExperimentConfig:
    return ExperimentConfig.from_run_config(dict(items))


def _step(msg: Message, context: Context, train: bool) -> Message:
    cfg = _config(context)
    node = _partition_id(context)
    rt = node_runtime(cfg, node)
    algo = algorithm_for(cfg)
    rnd = int(msg.content.config_records["config"]["round"])
    weights, combine_kwargs = mixing_inputs(cfg, algo, node, rnd)
    state = context.state
    params = from_record(state.array_records[STATE_PARAMS]) if STATE_PARAMS in state else None
    algo_state = from_record(state.array_records[STATE_ALGO]) if STATE_ALGO in state else None
    optim = from_record(state.array_records[STATE_OPTIM]) if STATE_OPTIM in state else None
    config = msg.content.config_records["config"]
    if "event" in config:  # mode=async: what this call is (AD-PSGD)
        combine_kwargs["event"] = str(config["event"])
    train = train and bool(config.get("train", True))  # mode=async: a call may train nothing
    result = run_round(
        rt,
        algo,
        params,
        algo_state,
        optim,
        unpack_inbox(msg.content),
        weights,
        rnd=rnd,
        do_eval=bool(config["evaluate"]),
        train=train,
        combine_kwargs=combine_kwargs,
        steps_fraction=float(config["steps-fraction"]) if "steps-fraction" in config else 1.0,
        activation=int(config["activation"]) if "activation" in config else None,
    )
    # Only a round that completed changes the state: a node that raises keeps the one it had.
    state[STATE_PARAMS] = kept = to_record(result.params)
    state[STATE_ALGO] = to_record(result.state)
    state[STATE_OPTIM] = to_record(result.optimizer)
    if algo.per_receiver_messages:  # one message per receiver: out:<k>
        outbox = {k: to_record(m) for k, m in result.message.items()}
        sent = sum(payload_bytes(m) for m in outbox.values())
        content = RecordDict({"metrics": _metrics(result, sent)})
        pack_outbox(content, outbox)
    else:
        out = to_record(result.message, reuse=(result.params, kept))
        sent = payload_bytes(out) if out else 0
        content = RecordDict({"out": out, "metrics": _metrics(result, sent)})
    if result.accuracy is not None:
        # monitoring only (the relay's consensus distance), not traffic between nodes
        content[MONITOR] = to_record(result.combined)
    return Message(content, reply_to=msg)


def _metrics(result: RoundResult, sent: int) -> MetricRecord:
    values = {"train_loss": result.train_loss, "payload_bytes": sent,
              "train_s": result.train_s, "eval_s": result.eval_s}  # fmt: skip
    if result.accuracy is not None:
        values.update(accuracy=result.accuracy, loss=result.loss)
    if result.unseen_accuracy is not None:  # a MetricRecord holds no None: absent means none
        values["unseen_accuracy"] = result.unseen_accuracy
    if result.domain_accuracy is not None:
        values["domain_accuracy"] = result.domain_accuracy
    return MetricRecord(values)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Combine with neighbours' last messages, evaluate if asked, train locally, reply."""
    return _step(msg, context, train=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Final combine with the last round's messages, then evaluate (no training).

    When the relay names a ``final-dir``, the node also saves its final trainable parameters
    there, so plots (e.g. attention maps) can rebuild its model without re-running training.
    """
    reply = _step(msg, context, train=False)
    final_dir = msg.content.config_records["config"].get("final-dir")
    if final_dir:
        params = from_record(context.state.array_records[STATE_PARAMS])
        write_params(node_params_path(Path(str(final_dir)), _partition_id(context)), params)
    return reply


@app.query("checkpoint")
def checkpoint(msg: Message, context: Context) -> Message:
    """Write this node's state into the checkpoint folder the relay names."""
    state = context.state
    folder = Path(str(msg.content.config_records["config"]["path"]))
    write_node_state(
        node_file(folder, _partition_id(context)),
        from_record(state.array_records[STATE_PARAMS]) if STATE_PARAMS in state else None,
        from_record(state.array_records[STATE_ALGO]) if STATE_ALGO in state else None,
        from_record(state.array_records[STATE_OPTIM]) if STATE_OPTIM in state else None,
    )
    return Message(RecordDict(), reply_to=msg)


@app.query("restore")
def restore(msg: Message, context: Context) -> Message:
    """Replace this node's state with the one saved in the checkpoint folder the relay names."""
    folder = Path(str(msg.content.config_records["config"]["path"]))
    params, algo, optim = read_node_state(node_file(folder, _partition_id(context)))
    state = context.state
    for key, value in ((STATE_PARAMS, params), (STATE_ALGO, algo), (STATE_OPTIM, optim)):
        if value is None:
            state.pop(key, None)
        else:
            state[key] = to_record(value)
    return Message(RecordDict(), reply_to=msg)


__all__ = ["app"]
