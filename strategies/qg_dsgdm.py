"""QG-DSGDm: decentralized SGD with quasi-global momentum (Lin, Karimireddy, Stich, Jaggi, 2021).

Local heavy-ball momentum on heterogeneous data amplifies each node's own bias. Quasi-global
momentum instead builds the momentum buffer from how the node's model moved over a whole round
*after gossip*, an estimate of the global update direction. Per node i and round t, with K
local steps of step size eta and x_i^t the round's starting model:

    z <- x_i^t; K times: z <- sgd_step(z) - eta * beta * m_i        heavy ball, buffer held fixed
    x_i^{t+1} = sum_j W_ij z_j                                       gossip (DSGD)
    m_i <- beta * m_i + (1 - beta) * (x_i^t - x_i^{t+1}) / (K eta)  quasi-global momentum

With K = 1 this is the paper's Algorithm 1 with heavy-ball momentum (the authors' code restores
the SGD momentum buffer after each step and rebuilds it from the gossiped model difference, as
here). The buffer replaces the optimizer's own momentum, so the config accepts it with
``optimizer=sgd`` only (AdamW would add a second momentum and normalise the first).

Mapped onto the harness's round: ``combine`` is DSGD's combine followed by the buffer update (it
needs the round's starting model, kept in the state, and last round's K eta, ``step_size``);
``local_correction`` hands the training loop beta * m_i; ``message`` sends the trained model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.base import GossipAlgorithm, Params, State, prefixed
from strategies.dsgd import DSGD
from strategies.registry import ConfigError

_STEP = "qg/step"


def _key(var: str, name: str) -> str:
    return f"qg/{var}/{name}"


class QGDSGDm(GossipAlgorithm):
    """DSGD with quasi-global heavy-ball momentum; messages are the trained models."""

    name = "qg-dsgdm"
    needs_step_size = True

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigError("momentum", momentum, "a momentum coefficient in [0, 1)")
        self.momentum = momentum
        self._gossip = DSGD()

    def init_state(self, params: Params) -> State:
        """m: the quasi-global buffer (0); x: the round's starting model."""
        state: State = {_STEP: np.zeros(1)}
        for k, v in params.items():
            state[_key("m", k)] = np.zeros_like(v)
            state[_key("x", k)] = np.array(v, copy=True)
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
        """DSGD's combine, then m <- beta m + (1 - beta) (x^t - x^{t+1}) / (K eta)."""
        mixed = self._gossip.combine(params, state, inbox, weights, node)
        last_step = float(state[_STEP][0])
        for k, v in mixed.items():
            if last_step > 0:  # a round was trained since the buffer was last updated
                moved = (state[_key("x", k)] - v) / last_step
                state[_key("m", k)] = (self.momentum * state[_key("m", k)]
                                       + (1.0 - self.momentum) * moved).astype(v.dtype)  # fmt: skip
            state[_key("x", k)] = np.array(v, copy=True)
        state[_STEP][0] = step_size
        return mixed

    def local_correction(self, state: State) -> Params:
        """Beta * m_i, subtracted (times the step size) after every local SGD step."""
        return {k: self.momentum * m for k, m in prefixed(state, "qg/m/").items()}

    def message(self, params: Params, state: State) -> Params:
        """The freshly trained parameters."""
        return params
