"""Gradient tracking with local updates: a tracker y_i of the network-average update.

The local-training displacement plays the gradient: d_i^t = x_i^t - train_i(x_i^t) (= eta *
grad f_i(x_i^t) for one SGD step). Per node i and round t (y^{-1} = d^{-1} = 0):

    x_i^t = sum_j W_ij (x_j^{t-1} - y_j^{t-1})         combine (neighbours' messages)
    d_i^t = x_i^t - train_i(x_i^t)                      local training
    y_i^t = sum_j W_ij y_j^{t-1} + d_i^t - d_i^{t-1}    message
    send  x_i^t - y_i^t  and  y_i^t

In matrix form x^{t+1} = W (x^t - y^t), y^{t+1} = W y^t + d^{t+1} - d^t: the "adapt then
combine" DIGing / NEXT recursion (Nedic et al. 2017; Qu & Li 2018), with a local-training
displacement as the gradient. Since the columns of W sum to 1, sum_i y_i^t = sum_i d_i^t at every
round, so the average model moves exactly as in DSGD; but at a fixed point y is consensual, hence
0, and x is consensual with sum_i d_i(x) = 0. DSGD's bias from heterogeneous local objectives is
gone (with one local step the fixed point is the exact optimum; with K > 1 steps a client-drift
bias of order eta * K remains, as in FedAvg). Without mixing y (y = d) this is exactly DSGD.

The tracked iterate is the *combined* x_i^t; the trained parameters are only a probe for d_i^t.
Missing messages are handled as in DSGD (their weight goes to the node itself); that keeps W
row-stochastic but breaks sum_i y_i = sum_i d_i, so lost messages bias the tracker.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.base import GossipAlgorithm, Params, State


def _key(var: str, name: str) -> str:
    return f"gt/{var}/{name}"


class GradientTracking(GossipAlgorithm):
    """Gossip of (x - y, y), y tracking the average local update; messages ``x/``, ``y/``."""

    name = "gradient-tracking"

    def init_state(self, params: Params) -> State:
        """x: the combined iterate (where training starts); y: the tracker; d: last displacement."""
        state: State = {}
        for k, v in params.items():
            state[_key("x", k)] = np.array(v, copy=True)
            state[_key("y", k)] = np.zeros_like(v)
            state[_key("d", k)] = np.zeros_like(v)
        return state

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
    ) -> Params:
        """x_i = sum_j W_ij (x_j - y_j); keeps sum_j W_ij y_j - d_i for ``message``."""
        arrived = sorted(j for j in inbox if j != node and j in weights)
        self_weight = 1.0 - sum(weights[j] for j in arrived)
        out = {}
        for k, v in params.items():
            own_y = state[_key("y", k)]
            # The node's own message, rebuilt from its state rather than trusting ``params``.
            x_mix = self_weight * (state[_key("x", k)] - own_y)
            y_mix = self_weight * own_y
            for j in arrived:
                x_mix = x_mix + weights[j] * inbox[j][f"x/{k}"]
                y_mix = y_mix + weights[j] * inbox[j][f"y/{k}"]
            out[k] = x_mix.astype(v.dtype, copy=False)
            state[_key("x", k)] = out[k].copy()
            # Until ``message`` runs, "y" holds sum_j W_ij y_j^{t-1} - d_i^{t-1}.
            state[_key("y", k)] = (y_mix - state[_key("d", k)]).astype(v.dtype, copy=False)
        return out

    def message(self, params: Params, state: State) -> Params:
        """d_i from the trained parameters, then y_i; sends x_i - y_i and y_i."""
        msg = {}
        for k, trained in params.items():
            x = state[_key("x", k)]
            d = x - trained
            y = state[_key("y", k)] + d
            state[_key("d", k)] = d
            state[_key("y", k)] = y
            msg[f"x/{k}"] = x - y
            msg[f"y/{k}"] = y.copy()
        return msg
