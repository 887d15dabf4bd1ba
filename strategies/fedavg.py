"""FedAvg (McMahan et al. 2017): the non-P2P reference, a server average done at every node.

Every node hears every other node (the harness relays over the complete graph whatever the
``topology`` key says) and takes the sample-weighted average of all trained models,
x_i <- sum_j n_j x_j / sum_j n_j. Each node computes exactly what a FedAvg server would
broadcast, so the ServerApp still combines nothing. Bytes are counted as a real server would
cause them: one upload per node per round, and the server's broadcast of the average (the model
without ``COUNT_KEY``) back to every node (``flower_p2p.network.Traffic``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.base import GossipAlgorithm, Params, State, weighted_sum

# The sample count travels beside the model; the server's broadcast carries the model only.
COUNT_KEY = "fedavg/n"


class FedAvg(GossipAlgorithm):
    """Sample-weighted average of all nodes' models (needs every node's message)."""

    name = "fedavg"
    needs_num_examples = True

    def combine(
        self,
        params: Params,
        state: State,
        inbox: Mapping[int, Params],
        weights: Mapping[int, float],
        node: int,
        num_examples: int = 1,
    ) -> Params:
        """Sample-weighted average of own and received models; ``weights`` values are unused."""
        state[COUNT_KEY] = np.array([float(num_examples)])
        senders = sorted(j for j in inbox if j != node)
        if not senders:
            return params
        counts = {node: float(num_examples), **{j: float(inbox[j][COUNT_KEY][0]) for j in senders}}
        total = sum(counts.values())
        models = {node: params, **{j: {k: inbox[j][k] for k in params} for j in senders}}
        return weighted_sum([(counts[j] / total, models[j]) for j in sorted(models)])

    def message(self, params: Params, state: State) -> Params:
        """The trained model and the node's sample count."""
        return {**params, COUNT_KEY: state[COUNT_KEY]}
