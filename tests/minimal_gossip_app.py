"""A second Flower app that adopts gossip: its own model, its own ClientApp, our strategy.

Each node fits a linear least-squares model on its own rows (``problem``); the ServerApp starts
``GossipStrategy`` as a federated app would start ``FedAvg``, and the ClientApp calls the node
side (``gossip_node``) around its own gradient step. Nothing of the ViT experiment is used. At
the final evaluation every node writes its combined model to ``<out-dir>/node-<i>.npy``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flower_p2p.config import ExperimentConfig
from flower_p2p.gossip_node import GossipNode, identify
from flower_p2p.gossip_strategy import GossipStrategy
from flower_p2p.wire import from_record, to_record

ROWS, DIM, LR = 20, 5, 0.05

server = ServerApp()
client = ClientApp()
client.query()(identify)


def problem(num_nodes: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Node i's rows A_i and targets b_i, each node with its own planted solution."""
    rng = np.random.default_rng(seed)
    a = [rng.normal(size=(ROWS, DIM)) for _ in range(num_nodes)]
    b = [a[i] @ (3.0 * rng.normal(size=DIM)) for i in range(num_nodes)]
    return a, b


def gradient(node: int, x: np.ndarray, num_nodes: int) -> np.ndarray:
    """The full gradient of node ``node``'s least-squares loss."""
    a, b = problem(num_nodes)
    return a[node].T @ (a[node] @ x - b[node]) / ROWS


def local_step(node: int, x: np.ndarray, num_nodes: int) -> np.ndarray:
    """One full-gradient step on node ``node``'s least-squares loss."""
    return x - LR * gradient(node, x, num_nodes)


def _config(context: Context) -> ExperimentConfig:
    return ExperimentConfig.from_run_config(dict(context.run_config))


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Gossip instead of FedAvg: swap the strategy, keep the rest."""
    cfg = _config(context)
    GossipStrategy(cfg).start(grid, ArrayRecord(), num_rounds=cfg.num_rounds)


def _model(context: Context) -> dict[str, np.ndarray]:
    if "model" in context.state:
        return from_record(context.state.array_records["model"])
    return {"x": np.zeros(DIM)}


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Combine with the neighbours' messages, take a gradient step, send."""
    cfg = _config(context)
    node = GossipNode(cfg)
    combined = node.combine(msg, context, _model(context))
    pid = int(context.node_config["partition-id"])
    if node.algo.corrects_gradient:  # K-GT-grad: its correction goes into the gradient
        g = gradient(pid, combined["x"], cfg.num_nodes) + node.correction(context)["x"]
        trained = {"x": combined["x"] - LR * g}
        context.state["model"] = to_record(trained)
        return node.reply(msg, context, trained, {"train_loss": 0.0}, mean_gradient={"x": g})
    trained = {"x": local_step(pid, combined["x"], cfg.num_nodes)}
    context.state["model"] = to_record(trained)
    return node.reply(msg, context, trained, {"train_loss": 0.0})


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The last combine; the node writes its model where the run config says."""
    cfg = _config(context)
    combined = GossipNode(cfg).combine(msg, context, _model(context))
    pid = int(context.node_config["partition-id"])
    np.save(Path(cfg.out_dir) / f"node-{pid}.npy", combined["x"])
    metrics = MetricRecord({"accuracy": 0.0, "loss": float(np.linalg.norm(combined["x"]))})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
