"""K-GT: gradient tracking with local steps (Liu, Lin, Koloskova, Stich, 2023).

Every local step of node i is corrected by a tracker c_i of how the network's average update
differs from its own, so several local steps on heterogeneous data no longer drift apart. Per
node i and round t, with K local steps of step size eta (the round's learning rate) and x_i^t the
round's starting model:

    z <- x_i^t; K times: z <- opt_step(z) - eta * c_i            local training, corrected
    D_i = (x_i^t - z) / (K eta)                                  the round's mean corrected update
    c_i <- c_i - D_i + sum_j W_ij D_j                            tracker, once per round
    x_i^{t+1} = sum_j W_ij x_j^t - K eta sum_j W_ij D_j          gossip of models and updates

(the paper's global step eta_s is 1 here).

Since sum_i c_i stays 0 (W doubly stochastic), the correction moves no mass; at a fixed point every
node's corrected update equals the network average, so K local steps reach the exact optimum of
sum_i f_i (tested on least squares with K = 3, where plain gradient tracking keeps an O(eta K)
client-drift bias). As in the authors' code, the correction is applied to the parameters after
each optimizer step (``local_correction``), not fed to the optimizer: with SGD this is the same as
adding c_i to the gradient; with AdamW the tracker works on AdamW's updates (per-coordinate
normalised), the correction itself is not normalised, and the exactness argument holds for the
update directions AdamW takes, not for the gradients.

Mapped onto the harness's round (combine, train, message): ``combine`` receives the neighbours'
(x_j^t, D_j) sent last round, applies the two gossip updates and remembers the new starting
model and this round's K eta (``step_size``); ``message`` computes D_i from the trained model.
A missing message gives its weight to the node itself, as in DSGD.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.base import GossipAlgorithm, Params, State, prefixed

_STEP = "kgt/step"


def _key(var: str, name: str) -> str:
    return f"kgt/{var}/{name}"


class KGT(GossipAlgorithm):
    """K-GT; messages ``x/<name>`` (round-start model) and ``d/<name>`` (mean update)."""

    name = "k-gt"
    needs_step_size = True

    def init_state(self, params: Params) -> State:
        """x: the round's starting model; c: the tracker (0); d: the last mean update (0)."""
        state: State = {_STEP: np.zeros(1)}
        for k, v in params.items():
            state[_key("x", k)] = np.array(v, copy=True)
            state[_key("c", k)] = np.zeros_like(v)
            state[_key("d", k)] = np.zeros_like(v)
        return state

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
        step_size: float = 0.0,
    ) -> Params:
        """Gossip of models and mean updates, tracker update; remembers this round's K eta."""
        arrived = sorted(j for j in inbox if j != node and j in weights)
        last_step = float(state[_STEP][0])
        out = {}
        for k, v in params.items():
            if arrived:
                self_w = 1.0 - sum(weights[j] for j in arrived)
                x_mix = self_w * state[_key("x", k)] + sum(
                    weights[j] * inbox[j][f"x/{k}"] for j in arrived)  # fmt: skip
                d_own = state[_key("d", k)]
                d_mix = self_w * d_own + sum(weights[j] * inbox[j][f"d/{k}"] for j in arrived)
                state[_key("c", k)] = state[_key("c", k)] - d_own + d_mix
                new = x_mix - last_step * d_mix
            else:  # nothing heard (first round, or cut off): keep the trained model
                new = v
            out[k] = np.asarray(new, dtype=v.dtype)
            state[_key("x", k)] = out[k].copy()
        state[_STEP][0] = step_size
        return out

    def local_correction(self, state: State) -> Params:
        """c_i, subtracted (times the step size) after every local optimizer step."""
        return prefixed(state, "kgt/c/")

    def message(self, params: Params, state: State) -> Params:
        """D_i = (x_i - z_i) / (K eta) from the trained z_i; sends x_i and D_i."""
        step = float(state[_STEP][0])
        if step <= 0:
            raise ValueError("k-gt needs the round's step size (K * learning rate) in combine")
        msg = {}
        for k, trained in params.items():
            x = state[_key("x", k)]
            d = ((x - trained) / step).astype(trained.dtype)
            state[_key("d", k)] = d
            msg[f"x/{k}"] = x.copy()
            msg[f"d/{k}"] = d.copy()
        return msg


def _gkey(var: str, name: str) -> str:
    return f"kgtg/{var}/{name}"


class KGTGradient(GossipAlgorithm):
    """K-GT with the correction in the gradient; messages ``x/<name>``, ``d/<name>``.

    Per node i and round t, with g the local minibatch gradients::

        z <- x_i^t; K times: z <- opt_step(z, g(z) + c_i)          corrected gradient, any optimizer
        D_i = mean over the K steps of (g + c_i)                   reported by the training loop
        c_i <- c_i - D_i + sum_j W_ij D_j                          tracker, once per round
        x_i^{t+1} = sum_j W_ij z_j                                 gossip of the trained models

    With plain SGD, z_j = x_j - K eta D_j, so this is ``KGT`` step for step (tested). With AdamW
    it differs where it matters: ``KGT`` tracks AdamW's per-node normalised displacements, whose
    network average vanishes at a different point than the average gradient (a biased fixed
    point on heterogeneous least squares, tested); here every node's AdamW sees its gradient
    corrected towards the network's average gradient, so the nodes' moment estimates track the
    same quantity a single AdamW over all the data would (GTAdam's idea, Carnevale et al., 2022,
    with K-GT's local steps). Units are gradients, so no step size is needed and a straggler's
    fewer steps still report a mean gradient. Same bytes as ``KGT``: a model and a gradient.
    A missing message gives its weight to the node itself, as in DSGD and ``KGT``.
    """

    name = "k-gt-grad"
    corrects_gradient = True

    def init_state(self, params: Params) -> State:
        """c: the tracker (0); d: the last mean corrected gradient (0)."""
        state: State = {}
        for k, v in params.items():
            state[_gkey("c", k)] = np.zeros_like(v)
            state[_gkey("d", k)] = np.zeros_like(v)
        return state

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
    ) -> Params:
        """Gossip of the trained models, and the tracker update from the mean gradients."""
        arrived = sorted(j for j in inbox if j != node and j in weights)
        if not arrived:  # nothing heard (first round, or cut off): keep the trained model
            return dict(params)
        self_w = 1.0 - sum(weights[j] for j in arrived)
        out = {}
        for k, v in params.items():
            mixed = self_w * v + sum(weights[j] * inbox[j][f"x/{k}"] for j in arrived)
            out[k] = np.asarray(mixed, dtype=v.dtype)
            d_own = state[_gkey("d", k)]
            d_mix = self_w * d_own + sum(weights[j] * inbox[j][f"d/{k}"] for j in arrived)
            state[_gkey("c", k)] = np.asarray(state[_gkey("c", k)] - d_own + d_mix,
                                              dtype=d_own.dtype)  # fmt: skip
        return out

    def local_correction(self, state: State) -> Params:
        """c_i, added to every local gradient before the optimizer step."""
        return prefixed(state, "kgtg/c/")

    def observe_gradient(self, state: State, mean_gradient: Params) -> None:
        """Keeps D_i, the mean corrected gradient of this round's local steps."""
        for k, g in mean_gradient.items():
            key = _gkey("d", k)
            state[key] = np.asarray(g, dtype=state[key].dtype).reshape(state[key].shape)

    def message(self, params: Params, state: State) -> Params:
        """The trained model z_i and D_i."""
        msg = {f"x/{k}": v.copy() for k, v in params.items()}
        msg.update({f"d/{k}": state[_gkey("d", k)].copy() for k in params})
        return msg
