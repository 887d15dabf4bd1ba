"""A pure-numpy reference loop: every node of a gossip run, simulated in one process.

It fixes the round semantics every transport must reproduce. Round t at each node i:

1. ``params_i = algo.combine(params_i, state_i, inbox_i, weights_i, i)``, where ``inbox_i``
   holds the messages its in-neighbours sent in round t - 1 (none in round 0);
2. ``params_i = local_step(i, params_i, t)``: local training;
3. ``msg_i = algo.message(params_i, state_i)``, delivered to i's out-neighbours for round t + 1.

After the last round one more combine (without training) merges the last messages, and those
combined parameters are returned: for tracking and push-sum methods they, not the trained ones,
are the iterates that converge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from strategies.base import GossipAlgorithm, Params

LocalStep = Callable[[int, Params, int], Params]
"""(node, params, round) -> trained params; must return new arrays, not update in place."""


def run_gossip(
    algo: GossipAlgorithm,
    mixing: np.ndarray,
    local_step: LocalStep,
    x0: Params | Sequence[Params],
    rounds: int,
    *,
    node_kwargs: Sequence[Mapping[str, Any]] | None = None,
    lost: Callable[[int, int, int], bool] | None = None,
    on_round: Callable[[int, list[Params]], None] | None = None,
) -> list[Params]:
    """Run ``rounds`` gossip rounds on all nodes; the combined parameters after the last round.

    ``mixing[i, j] != 0`` means node i hears node j; row i (over i and its in-neighbours) is the
    ``weights`` node i's combine gets, and i's message goes to every j with ``mixing[j, i] != 0``.
    ``x0`` is one starting point for all nodes or one per node. ``node_kwargs[i]`` are extra
    keyword arguments for node i's combine (e.g. push-sum's ``out_degree``). ``lost(t, j, i)``
    drops the message j sent to i in round t. ``on_round(t, combined)`` sees the combined
    parameters of every node before round t's training.
    """
    n = mixing.shape[0]
    starts = [x0] * n if isinstance(x0, Mapping) else list(x0)
    params = [{k: np.array(v, copy=True) for k, v in p.items()} for p in starts]
    states = [algo.init_state(p) for p in params]
    rows = [
        {j: float(mixing[i, j]) for j in range(n) if j == i or mixing[i, j] != 0} for i in range(n)
    ]
    extra = node_kwargs or [{}] * n
    inboxes: list[dict[int, Params]] = [{} for _ in range(n)]
    for t in range(rounds + 1):
        params = [
            algo.combine(params[i], states[i], inboxes[i], rows[i], i, **extra[i]) for i in range(n)
        ]
        if on_round is not None:
            on_round(t, params)
        if t == rounds:
            break
        sent = []
        for i in range(n):
            params[i] = local_step(i, params[i], t)
            sent.append(algo.message(params[i], states[i]) if algo.communicates else {})
        inboxes = [
            {
                j: sent[j]
                for j in range(n)
                if j != i
                and mixing[i, j] != 0
                and algo.communicates
                and not (lost is not None and lost(t, j, i))
            }
            for i in range(n)
        ]
    return params
