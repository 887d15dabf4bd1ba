"""CHOCO-SGD: gossip with compressed messages and error feedback through public copies.

Koloskova, Stich, Jaggi (ICML 2019), Algorithm 2, per node i and round t:

    x_i^{t+1/2} = x_i^t - eta * grad f_i(x_i^t)                     (local training)
    q_i^t       = Q(x_i^{t+1/2} - x_hat_i^t)                         (message)
    x_hat_j^{t+1} = x_hat_j^t + q_j^t        for every holder of a copy of x_hat_j
    x_i^{t+1}   = x_i^{t+1/2} + gamma * sum_j W_ij^t (x_hat_j^{t+1} - x_hat_i^{t+1})

Mapped onto one round of the harness (combine, train, message): ``message`` computes q_i from the
trained parameters and adds it to the node's own copy at once; every holder of a copy of x_hat_i
adds it in its next ``combine``, which then takes the consensus step over that round's weights.
All copies start at 0.

The copies are the algorithm's invariant: node j's copy of x_hat_i must equal node i's own, so
that sum_i x_i moves only by local training. A copy is a running sum of increments, so its holder
must receive *every* q_i, also in rounds where it does not mix with i. On a static graph the
holders are the neighbours. On a graph that changes every round (``one-peer-exponential``,
``random-matching``) they are the union of the schedule's graphs (``keeps_neighbour_copies``: the
network delivers q_i there and the bytes of every delivery count), while the consensus step uses
only the round's weights. Mixing with a copy that missed increments breaks the invariant: the
average drifts and the run computes garbage (on ``one-peer-exponential`` it diverged).

Because the sender adds the *decoded* q_i to its copy, sender and receivers hold bit-identical
copies of x_hat_i as long as no message is lost. A lost message desynchronises a copy for the rest
of the run (CHOCO has no repair for it), so runs with message loss (``link-drop``,
``node-dropout``, ``fail-every``) are refused for ``choco`` (``flower_p2p.config``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.base import GossipAlgorithm, Params, State
from strategies.compression import Compressor, create_compressor, decode_params, encode_params
from strategies.registry import ConfigError

_NODE = "choco/node"
_ROUND = "choco/round"


def _hat(owner: str | int, name: str | None) -> str:
    return f"hat/{owner}/{name}"


class Choco(GossipAlgorithm):
    """CHOCO-SGD; ``compressor="none", gamma=1`` computes the same models as DSGD.

    With nothing compressed x_hat_j = x_j, so x_i + sum_j W_ij (x_j - x_i) = sum_j W_ij x_j: DSGD's
    combine up to floating-point rounding, on every graph and schedule. The bytes differ where the
    graph changes every round: CHOCO sends to every node that holds a copy (see the module).

    The stable gamma shrinks with the compressor's contraction: in numpy checks on an 8-node ring
    (1000-dim vectors, 10% kept) top-k diverged from gamma = 0.4 and random-k from 0.2, while 8-bit
    was stable up to 1; hence the conservative default 0.1.
    """

    name = "choco"
    keeps_neighbour_copies = True
    tolerates_lost_messages = False

    def __init__(
        self,
        gamma: float = 0.1,
        compressor: str = "top-k",
        compress_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ConfigError("gamma", gamma, "a consensus step size in (0, 1]")
        self.gamma = gamma
        self.compressor: Compressor = create_compressor(compressor, compress_fraction)
        self.seed = seed

    def init_state(self, params: Params) -> State:
        """The node's public copy x_hat_i (zeros) and the keys of its compression randomness."""
        state: State = {_hat("self", k): np.zeros_like(v) for k, v in params.items()}
        # Node id and round live in the state, not in this shared instance, so that random-k
        # draws differ per node and per round even if the algorithm is re-created every round.
        state[_NODE] = np.zeros(1, dtype=np.int64)  # set by the first combine
        state[_ROUND] = np.zeros(1, dtype=np.int64)
        return state

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
    ) -> Params:
        """Add every received q_j to the copy x_hat_j, then step towards this round's neighbours.

        The inbox may hold increments of nodes that are not in ``weights`` this round (other
        neighbours over the schedule): their copies are updated all the same.
        """
        state[_NODE][0] = node
        for j in sorted(inbox):
            if j == node:
                continue
            q = decode_params(self.compressor, inbox[j], params)
            for k, v in q.items():
                key = _hat(j, k)
                if key not in state:
                    state[key] = np.zeros_like(v)
                state[key] += v
        # Copies exist only for neighbours heard from at least once (all keys arrive together).
        first = next(iter(params), None)
        known = [j for j in sorted(weights) if j != node and _hat(j, first) in state]
        if not known:
            return params
        out = {}
        for k, x in params.items():
            own = state[_hat("self", k)]
            pull = np.zeros_like(x, dtype=np.float64)
            for j in known:
                pull += weights[j] * (state[_hat(j, k)] - own)
            out[k] = (x + self.gamma * pull).astype(x.dtype, copy=False)
        return out

    def message(self, params: Params, state: State) -> Params:
        """q_i = Q(x_i - x_hat_i), already added to the node's own copy x_hat_i."""
        node, rnd = int(state[_NODE][0]), int(state[_ROUND][0])
        rng = np.random.default_rng([self.seed, node, rnd])
        state[_ROUND][0] = rnd + 1
        diff = {k: x - state[_hat("self", k)] for k, x in params.items()}
        msg = encode_params(self.compressor, diff, rng)
        for k, v in decode_params(self.compressor, msg, params).items():
            state[_hat("self", k)] += v
        return msg
