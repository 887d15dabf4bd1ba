"""RelaySum / RelaySGD: every node averages every model, talking only to its tree neighbours.

Vogels, Karimireddy, Jaggi et al. (NeurIPS 2021), RelaySum/Model. The nodes talk over a spanning
tree of the graph. Node i sends each tree neighbour j a *different* message: its own model plus
everything its other neighbours relayed to it last round, with the count of models in that sum,

    m_{i->j}^t = x_i^t + sum_{k in N(i) - j} m_{k->i}^{t-1},
    c_{i->j}^t = 1 + sum_{k in N(i) - j} c_{k->i}^{t-1},

so on a tree every model reaches every node, each exactly once, delayed by its distance. Node i's
new model is the uniform average over all n nodes of what it has, the missing ones (models still
on their way in the first rounds) filled in with the initial model x^0, as in the paper's
"world size" normalisation:

    x_i <- (x_i + sum_k m_{k->i} + (n - 1 - sum_k c_{k->i}) x^0) / n.

Each node thus holds (1/n) sum_j x_j^{t - d(i, j)}: every model once, delayed by its distance. When
every node contributes a fixed model, every node holds their exact average after ``diameter``
rounds. (When the contributions are the averages themselves, as without any training, the
delays make it a weighted average, as in the paper.)
Unlike gossip, no mixing weights are used and the spectral gap does not matter, only the tree's
diameter. A lost or missing message: the receiver keeps the last message it got on that edge.
Messages are sums of whole models, not increments, so a stale one is a delayed sum with its
own count: the average stays an average of (older) models, with no bias towards any node; the
paper's own simulation instead drops it and fills its count with x^0.

Mapped onto the harness's round (combine, train, message): ``combine`` stores the messages that
arrived (or keeps the previous ones) and averages; ``message`` builds one message per receiver
from the freshly trained model and the stored ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.base import GossipAlgorithm, Params, State
from strategies.registry import ConfigError

_COUNT = "count"


def _stored(sender: int, name: str) -> str:
    return f"rs/in/{sender}/{name}"


def _x0(name: str) -> str:
    return f"rs/x0/{name}"


class RelaySum(GossipAlgorithm):
    """RelaySum/Model over a tree: one message per tree neighbour, ``x/<name>`` and ``count``."""

    name = "relay-sum"
    per_receiver_messages = True

    def __init__(self, num_nodes: int) -> None:
        if num_nodes < 1:
            raise ConfigError("num-nodes", num_nodes, "at least 1 node")
        self.num_nodes = num_nodes

    def init_state(self, params: Params) -> State:
        """The initial model x^0, which fills in for models that have not arrived yet."""
        return {_x0(k): np.array(v, copy=True) for k, v in params.items()}

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
    ) -> Params:
        """Store what arrived (a missing message keeps its last one); the uniform average."""
        for j, msg in inbox.items():
            if j == node:
                continue
            state[_stored(j, _COUNT)] = np.array(msg[_COUNT], dtype=np.float64, copy=True)
            for k in params:
                state[_stored(j, k)] = np.array(msg[f"x/{k}"], copy=True)
        senders = self._senders(state)
        if not senders:
            return params
        count = 1.0 + sum(float(state[_stored(j, _COUNT)][0]) for j in senders)
        missing = self.num_nodes - count
        if missing < -1e-9:
            raise ValueError(f"relay-sum at node {node} counted {count} models of "
                             f"{self.num_nodes}: the graph it runs on is not a tree")  # fmt: skip
        out = {}
        for k, x in params.items():
            total = x.astype(np.float64) + sum(state[_stored(j, k)] for j in senders)
            total = total + missing * state[_x0(k)]
            out[k] = (total / self.num_nodes).astype(x.dtype, copy=False)
        return out

    def message(self, params: Params, state: State, receivers: tuple[int, ...] = ()) -> dict:
        """For each receiver j: own model plus the sums stored from every other neighbour."""
        senders = self._senders(state)
        out: dict[int, Params] = {}
        for j in receivers:
            others = [s for s in senders if s != j]
            msg = {
                f"x/{k}": (x + sum(state[_stored(s, k)] for s in others)).astype(x.dtype)
                for k, x in params.items()
            }
            count = 1.0 + sum(float(state[_stored(s, _COUNT)][0]) for s in others)
            msg[_COUNT] = np.array([count])
            out[j] = msg
        return out

    @staticmethod
    def _senders(state: State) -> list[int]:
        return sorted({int(k.split("/")[2]) for k in state if k.startswith("rs/in/")})
