"""AD-PSGD (Lian et al., ICML 2018): asynchronous decentralized SGD by pairwise averaging.

A node computes its update on the model it held when its activation started; meanwhile
neighbours may average with it. At the end it averages atomically with one neighbour p, both
taking (x_i + x_p) / 2, and only then adds its own update: x_i <- (x_i + x_p) / 2 + delta_i.
Averaging two models preserves their sum, so with no updates every node converges to the
initial mean (tested on a known answer).

Which node averages with whom, and when, is the relay's schedule (``flower_p2p.clock.
PairwiseSchedule``); each call of a node says what it is with ``event``:

* ``start``: the first activation starts from the node's own model;
* ``finish``: the node's activation ended: average with the partner's model (the one message in
  the inbox), add the pending update, start the next activation from the result;
* ``pair``: a neighbour ended its activation and averages with this node: average, keep the
  pending update for the end of this node's own activation;
* ``final``: the model as it stands (the pending update of an unfinished activation is dropped).

State: ``x:<name>``, the node's current model (what it sends and averages), and ``delta:<name>``,
the update of its running activation. Runs only in ``mode=async``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.base import GossipAlgorithm, Params, State, prefixed

EVENTS = ("start", "finish", "pair", "final")


class ADPSGD(GossipAlgorithm):
    """Pairwise averaging with one neighbour at the end of every activation; update after."""

    name = "ad-psgd"
    needs_event = True

    def init_state(self, params: Params) -> State:
        """The current model, and no pending update."""
        state = {f"x:{k}": v.copy() for k, v in params.items()}
        state.update({f"delta:{k}": np.zeros_like(v) for k, v in params.items()})
        return state

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
        event: str = "start",
    ) -> Params:
        """The node's model after this call's exchange (``weights`` are not used: pairs are)."""
        if event not in EVENTS:
            raise ValueError(f"AD-PSGD event {event!r}: one of {', '.join(EVENTS)}")
        if len(inbox) > 1:
            raise ValueError(f"AD-PSGD averages with one neighbour at a time, got {sorted(inbox)}")
        x = prefixed(state, "x:")
        for other in inbox.values():
            # in float64, then back: the two nodes of a pair compute the same average
            x = {k: ((v.astype(np.float64) + other[k]) / 2).astype(v.dtype) for k, v in x.items()}
        if event == "finish":
            delta = prefixed(state, "delta:")
            x = {k: v + delta[k] for k, v in x.items()}
            state.update({f"delta:{k}": np.zeros_like(v) for k, v in x.items()})
        if event == "final":  # an activation that did not end by the horizon never happened
            state.update({f"delta:{k}": np.zeros_like(v) for k, v in x.items()})
        state.update({f"x:{k}": v for k, v in x.items()})
        return x

    def message(self, params: Params, state: State) -> Params:
        """After training from the current model: keep the update, send the model without it."""
        x = prefixed(state, "x:")
        state.update({f"delta:{k}": params[k] - x[k] for k in x})
        return x

    def resting_message(self, state: State) -> Params:
        """After a call that trained nothing (``pair``): the model the exchange left."""
        return prefixed(state, "x:")
