"""Stochastic Gradient Push: push-sum gossip, exact averaging on directed graphs.

Assran, Loizou, Ballas, Rabbat (ICML 2019), Algorithm 1 with uniform column-stochastic weights
p = 1 / (out_degree_i + 1). Node i keeps a numerator x_i and a weight w_i (x_i = w_i z_i); the
de-biased z_i is what trains and what the node reports. Per round t:

    x_i, w_i = own kept share + sum of the shares received     combine
    z_i = x_i / w_i                                            combine returns z_i
    d_i = z_i - train_i(z_i)                                   local training
    x_i <- x_i - d_i                                           message (unscaled, as in SGP)
    send (p x_i, p w_i) to each out-neighbour, keep (p x_i, p w_i)

Pushes conserve sum_i x_i and sum_i w_i (= n), so with column-stochastic mixing, however
unbalanced the graph, z_i -> sum_i x_i / n: the exact average, where row-stochastic averaging
converges to a stationary-distribution-weighted one. The update is applied to x_i unscaled, so
the average moves by -mean_i d_i; scaling it by w_i would weight node i's objective by its w_i.

State starts at x_i = z_i^0, w_i = 1, read as the share kept from a round -1 that sent nothing.
Lost messages lose mass and bias the average (no running-sum repair here).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.base import GossipAlgorithm, Params, State

_W = "ps/w"
_SHARE = "ps/share"


def _num(name: str) -> str:
    return f"ps/x/{name}"


class PushSum(GossipAlgorithm):
    """SGP over a (possibly directed) graph; messages ``x/<name>`` (numerator share) and ``w``.

    ``combine`` takes an optional ``out_degree``: the number of nodes this node's message reaches.
    Without it the out-neighbourhood is read from ``weights``'s keys, right on undirected graphs
    (the project's topologies); the weight values are not used, since the sender splits its mass
    uniformly and every receiver just sums what arrives.
    """

    name = "push-sum"
    needs_out_degree = True

    def init_state(self, params: Params) -> State:
        """Numerator x_i = params, weight w_i = 1."""
        state: State = {_num(k): np.array(v, copy=True) for k, v in params.items()}
        state[_W] = np.ones(1, dtype=np.float64)
        state[_SHARE] = np.ones(1, dtype=np.float64)
        return state

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
        out_degree: int | None = None,
    ) -> Params:
        """Sum the kept and received shares; return the de-biased z_i = x_i / w_i."""
        if out_degree is None:
            out_degree = sum(1 for j in weights if j != node)
        state[_SHARE][0] = 1.0 / (out_degree + 1)
        senders = sorted(j for j in inbox if j != node)
        state[_W][0] += sum(float(inbox[j]["w"][0]) for j in senders)
        out = {}
        for k, v in params.items():
            x = state[_num(k)]
            for j in senders:
                x = x + inbox[j][f"x/{k}"]
            state[_num(k)] = x
            out[k] = (x / state[_W][0]).astype(v.dtype, copy=False)
        return out

    def message(self, params: Params, state: State) -> Params:
        """Apply the training displacement to x_i; send and keep 1 / (out_degree + 1) of it."""
        w, share = float(state[_W][0]), float(state[_SHARE][0])
        msg = {}
        for k, trained in params.items():
            x = state[_num(k)]
            start = (x / w).astype(trained.dtype, copy=False)
            kept = (x - (start - trained)) * share
            state[_num(k)] = kept
            msg[f"x/{k}"] = kept.copy()
        state[_W][0] = w * share
        msg["w"] = state[_W].copy()
        return msg
