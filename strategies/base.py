"""What a gossip algorithm is: pure functions over a node's own arrays and its inbox.

No Flower and no torch here: parameters are ``dict[str, np.ndarray]`` so that every algorithm can
be tested on a least-squares problem with a known optimum, and run unchanged by any transport.

One round at node i (decentralized SGD with local steps, "combine, then adapt"):

1. ``combine``: merge own parameters with the messages neighbours sent last round,
   using node i's row of the mixing matrix;
2. the harness trains ``local-epochs`` on the node's own data;
3. ``message``: what node i sends to its neighbours this round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

Params = dict[str, np.ndarray]
State = dict[str, np.ndarray]


class GossipAlgorithm(ABC):
    """A decentralized algorithm as seen by one node; instances hold no per-node state."""

    name: str = ""
    communicates: bool = True
    # True when combine() takes ``out_degree``: how many nodes this node's message reaches.
    needs_out_degree: bool = False
    # True when combine() takes ``num_examples``: the size of the node's training data.
    needs_num_examples: bool = False
    # True when a node keeps a copy of each neighbour's public state, updated by the increments
    # that neighbour sends (CHOCO): every node it will ever mix with must get every message, so
    # the network delivers to the union of the schedule's graphs, not only this round's.
    keeps_neighbour_copies: bool = False
    # True when combine() takes ``step_size``: the sum of the learning rates of the local steps the
    # node is about to take this round (K * eta), for algorithms that normalise updates by it.
    needs_step_size: bool = False
    # True when a node sends each receiver its own message (RelaySum): ``message`` then takes the
    # receivers and returns {receiver: message}.
    per_receiver_messages: bool = False
    # False when a lost message breaks the algorithm for good (CHOCO's copies): the config then
    # refuses the faults that lose messages instead of letting the run compute garbage.
    tolerates_lost_messages: bool = True
    # True when combine() takes ``event``: what the relay's call is (AD-PSGD's start, finish,
    # pair, final), for algorithms that only run asynchronously.
    needs_event: bool = False
    # True when ``local_correction`` is added to every local gradient *before* the optimizer step
    # (K-GT-grad), instead of to the parameters after it; the training loop then reports the
    # mean corrected gradient of the node's local steps through ``observe_gradient``.
    corrects_gradient: bool = False

    def init_state(self, params: Params) -> State:
        """Extra per-node state the algorithm keeps between rounds (none by default)."""
        return {}

    @abstractmethod
    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
    ) -> Params:
        """New parameters of ``node`` from its own, its state and its neighbours' messages.

        ``weights`` is the node's row of the mixing matrix over its closed neighbourhood
        (``weights[node]`` is its self-weight). ``inbox`` holds the messages that arrived; a
        neighbour missing from it sent nothing (first round, dropped node or lost link). For a
        ``keeps_neighbour_copies`` algorithm the inbox may also hold messages of nodes that
        are not in ``weights`` this round (its other neighbours over the schedule).
        ``state`` may be updated in place.
        """

    def local_correction(self, state: State) -> Params | None:
        """A correction u applied after every local optimizer step: p <- p - lr * u (None: none).

        K-GT's tracker and QG-DSGDm's quasi-global momentum are such terms; with plain SGD it is
        the same as adding u to every gradient.
        """
        return None

    def observe_gradient(self, state: State, mean_gradient: Params) -> None:
        """The mean corrected gradient of the local steps just taken (``corrects_gradient`` only).

        Called after training, before ``message``: with an adaptive optimizer the model's
        displacement does not reveal the gradient, so the training loop hands it over.
        """
        raise NotImplementedError(f"{self.name} does not correct gradients")

    def resting_message(self, state: State) -> Params:
        """What the node sends after a call in which it trained nothing (default: nothing)."""
        return {}

    @abstractmethod
    def message(self, params: Params, state: State) -> Params:
        """What the node sends to every neighbour after local training.

        A ``per_receiver_messages`` algorithm takes ``receivers`` (the node's out-neighbours this
        round) as a third argument and returns ``{receiver: message}``.
        """


def weighted_sum(terms: list[tuple[float, Params]]) -> Params:
    """Sum_k w_k * x_k over dicts of equally shaped arrays (keys from the first term)."""
    first = terms[0][1]
    out = {k: np.zeros_like(v, dtype=np.float64) for k, v in first.items()}
    for w, params in terms:
        for k in out:
            out[k] += w * params[k]
    return {k: v.astype(first[k].dtype, copy=False) for k, v in out.items()}


def prefixed(state: State, prefix: str) -> Params:
    """The arrays of ``state`` stored under ``prefix``, keyed by the rest of their names."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
