"""Decentralized SGD with local steps (gossip averaging): x_i <- sum_j W_ij x_j, then train."""

from __future__ import annotations

from collections.abc import Mapping

from strategies.base import GossipAlgorithm, Params, State, weighted_sum


class DSGD(GossipAlgorithm):
    """Plain gossip averaging of the neighbours' latest models.

    Missing messages: the weight of a neighbour that sent nothing goes to the node itself
    (x_i keeps W_ii + sum of missing W_ij). The realised matrix stays symmetric when a link fails
    both ways and row-stochastic always, so no mass is created or lost at a node.
    """

    name = "dsgd"

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
    ) -> Params:
        """Weighted average over self and the neighbours whose message arrived."""
        arrived = sorted(j for j in inbox if j != node and j in weights)
        if not arrived:
            return params
        self_weight = 1.0 - sum(weights[j] for j in arrived)
        return weighted_sum([(self_weight, params)] + [(weights[j], inbox[j]) for j in arrived])

    def message(self, params: Params, state: State) -> Params:
        """The freshly trained parameters."""
        return params
