"""Local training only: the no-communication reference."""

from __future__ import annotations

from collections.abc import Mapping

from strategies.base import GossipAlgorithm, Params, State


class LocalOnly(GossipAlgorithm):
    """Each node trains on its own data and never mixes; nothing is sent."""

    name = "local"
    communicates = False

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
    ) -> Params:
        """Own parameters, unchanged."""
        return params

    def message(self, params: Params, state: State) -> Params:
        """Nothing."""
        return {}
