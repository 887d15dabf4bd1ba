"""How much an algorithm keeps and sends, in units of the model it trains, measured not assumed.

A memory estimate needs, per node: the state an algorithm keeps between rounds (trackers,
momentum buffers, copies of neighbours' models), the bytes it sends each round and the bytes it
receives. Rather than a table that drifts from the code, ``footprint`` runs the algorithm itself
for a few rounds on a tiny model, on a star whose centre has ``degree`` neighbours (a tree, so
that tree-only algorithms such as RelaySum run too), and reports the largest of each over the
nodes and rounds in multiples of the model's size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from strategies.base import GossipAlgorithm, Params, State
from strategies.harness import run_gossip

FLAGS = ("name", "communicates", "needs_out_degree", "needs_num_examples",
         "keeps_neighbour_copies", "needs_step_size", "per_receiver_messages",
         "needs_event", "corrects_gradient")  # fmt: skip
ROUNDS = 3  # enough for every state an algorithm grows on receipt (copies, relayed sums)


@dataclass(frozen=True)
class Footprint:
    """Largest per-node sizes over the rounds, each a multiple of the model's size."""

    state: float  # kept between rounds, beside the parameters themselves
    sent: float  # everything one node sends in a round (all receivers together)
    received: float  # everything one node's inbox holds


def _size(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(int(np.asarray(v).size) for v in arrays.values())


class _Recorder(GossipAlgorithm):
    """Forwards to an algorithm and records the sizes of what passes through."""

    def __init__(self, algo: GossipAlgorithm) -> None:
        self.algo = algo
        for flag in FLAGS:
            setattr(self, flag, getattr(algo, flag))
        self.state = self.sent = self.received = 0

    def init_state(self, params: Params) -> State:
        state = self.algo.init_state(params)
        self.state = max(self.state, _size(state))
        return state

    def combine(self, params, state, inbox, weights, node, **kwargs) -> Params:  # noqa: D102
        self.received = max(self.received, sum(_size(m) for m in inbox.values()))
        out = self.algo.combine(params, state, inbox, weights, node, **kwargs)
        self.state = max(self.state, _size(state))
        return out

    def local_correction(self, state: State) -> Params | None:  # noqa: D102
        return self.algo.local_correction(state)

    def resting_message(self, state: State) -> Params:  # noqa: D102
        return self.algo.resting_message(state)

    def observe_gradient(self, state: State, mean_gradient: Params) -> None:  # noqa: D102
        self.algo.observe_gradient(state, mean_gradient)

    def message(self, params, state, *receivers):  # noqa: D102
        msg = self.algo.message(params, state, *receivers)
        size = sum(_size(m) for m in msg.values()) if receivers else _size(msg)
        self.sent = max(self.sent, size)
        self.state = max(self.state, _size(state))
        return msg


def star_weights(degree: int) -> np.ndarray:
    """Metropolis-Hastings weights of the star whose centre (node 0) has ``degree`` leaves."""
    n = degree + 1
    w = np.zeros((n, n))
    w[0, 1:] = w[1:, 0] = 1.0 / n
    w[0, 0] = 1.0 / n
    w[np.arange(1, n), np.arange(1, n)] = 1.0 - 1.0 / n
    return w


def footprint(
    make_algo: Callable[[int], GossipAlgorithm], degree: int, size: int = 256
) -> Footprint:
    """Per-node state, sent and received sizes of an algorithm with ``degree`` neighbours.

    ``make_algo(num_nodes)`` builds the algorithm for a graph of that many nodes. Runs
    ``ROUNDS`` rounds on the star of ``degree + 1`` nodes with a local step that moves every
    parameter, so that no state stays empty by accident.
    """
    n = max(1, degree) + 1
    w = star_weights(n - 1)
    algo = make_algo(n)
    rec = _Recorder(algo)

    def local_step(i: int, params: Params, t: int, correction: Params | None = None,
                   gradient_correction: Params | None = None):  # fmt: skip
        trained = {k: 0.9 * v + 0.01 * (i + 1) for k, v in params.items()}
        if gradient_correction is not None:  # and the mean gradient it reports
            return trained, {k: 0.1 * v for k, v in params.items()}
        return trained

    x0 = [{"w": np.full(size, float(i), dtype=np.float32)} for i in range(n)]
    if algo.needs_event:  # asynchronous pairwise (AD-PSGD): one partner's model per call
        states = [rec.init_state(x) for x in x0]
        for t in range(ROUNDS):
            for i in range(n):
                j = (i + 1) % n
                x = rec.combine(x0[i], states[i], {j: x0[j]}, {}, i, event="finish")
                rec.message(local_step(i, x, t), states[i])
        return Footprint(rec.state / size, rec.sent / size, rec.received / size)
    kwargs = [{"num_examples": 10}] * n if algo.needs_num_examples else None
    run_gossip(rec, w, local_step, x0, ROUNDS, node_kwargs=kwargs, step_size=lambda t: 0.1)
    if not algo.communicates:
        rec.sent = rec.received = 0
    return Footprint(rec.state / size, rec.sent / size, rec.received / size)


__all__ = ["Footprint", "footprint", "star_weights"]
