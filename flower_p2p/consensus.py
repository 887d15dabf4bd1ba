"""Consensus distance of the models the nodes evaluate: monitoring only, never fed back.

``(1/n) sum_i ||x_i - mean_j x_j||^2`` over the parameters the nodes mix (``share``), split by
parameter group (``models.param_group``: attn, mlp, norm, head, embed, other; the groups sum to
the total). ``x_i`` is the model node i evaluates, after combining with its neighbours: for
push-sum the de-biased ``z_i``, for CHOCO and gradient tracking the combined iterate. It is
computed for every strategy from the models the nodes attach to their evaluation replies, one
model at a time (Welford's update), so the relay holds one running mean, not every node's model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flower_p2p.models import param_group


class ConsensusMeter:
    """Running mean and sum of squared deviations of models added one at a time."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: dict[str, np.ndarray] = {}
        self._m2: dict[str, float] = {}

    def add(self, params: Mapping[str, np.ndarray]) -> None:
        """Take one node's model into the running statistics (every node: the same keys)."""
        self.count += 1
        if self.count == 1:
            self._mean = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
            self._m2 = dict.fromkeys(params, 0.0)
            return
        if set(params) != set(self._mean):
            raise ValueError("every node's evaluated model must have the same parameters")
        for k, v in params.items():
            x = np.asarray(v, dtype=np.float64)
            delta = x - self._mean[k]
            self._mean[k] += delta / self.count
            self._m2[k] += float(np.vdot(delta, x - self._mean[k]))

    def by_group(self) -> dict[str, float]:
        """Consensus distance per parameter group; empty with fewer than two models."""
        if self.count < 2:
            return {}
        groups: dict[str, float] = {}
        for k, m2 in self._m2.items():
            groups[param_group(k)] = groups.get(param_group(k), 0.0) + m2 / self.count
        return groups


def consensus_by_group(models: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """The consensus distance per group of a list of models (see ``ConsensusMeter``)."""
    meter = ConsensusMeter()
    for m in models:
        meter.add(m)
    return meter.by_group()
