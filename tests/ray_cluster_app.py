"""The project's ClientApp, recording which Ray node ran each node's work (for the cluster test).

Every train/evaluate call appends the Ray node id of the process it ran in to the file named by
``FLOWER_P2P_RAY_NODE_LOG`` (the cluster's processes share this machine's disk), then does
exactly what ``flower_p2p.client_app`` does.
"""

from __future__ import annotations

import os

import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_p2p import client_app as ours
from flower_p2p.gossip_node import identify

app = ClientApp()
app.query()(identify)
app.query("configure")(ours.configure)


def _record() -> None:
    with open(os.environ["FLOWER_P2P_RAY_NODE_LOG"], "a") as log:
        log.write(ray.get_runtime_context().get_node_id() + "\n")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Our node's round, recorded."""
    _record()
    return ours.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Our node's final evaluation, recorded."""
    _record()
    return ours.evaluate(msg, context)
