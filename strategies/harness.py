"""A pure-numpy reference loop: every node of a gossip run, simulated in one process.

It fixes the round semantics every transport must reproduce. The communication graph may change
every round: ``schedule(t)`` is the mixing matrix of the messages sent in round t
(``W_t[i, j] != 0``: node i hears node j's round-t message, with that weight). Round t at node i:

1. ``params_i = algo.combine(params_i, state_i, inbox_i, row_i(W_{t-1}), i)``, where ``inbox_i``
   holds what was delivered to i from round t - 1 (nothing in round 0);
2. ``params_i = local_step(i, params_i, t)``: local training;
3. ``msg_i = algo.message(params_i, state_i)``, delivered for round t + 1 to every j with
   ``W_t[j, i] != 0`` (``per_receiver_messages``: one message per receiver, RelaySum's); an
   algorithm that keeps copies of its neighbours' public state
   (``keeps_neighbour_copies``: CHOCO) needs every increment of every node it will ever mix
   with, so its messages go to the union of the schedule's graphs (``reach``).

An algorithm that ``needs_out_degree`` (push-sum) gets the number of nodes its round-t message
reaches, read off W_t's column. After the last round one more combine (without training) merges
the last messages, and those combined parameters are returned: for tracking and push-sum methods
they, not the trained ones, are the iterates that converge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from strategies.base import GossipAlgorithm, Params

LocalStep = Callable[..., Params]
"""(node, params, round[, correction]) -> trained params; new arrays, not updated in place.

``correction`` (only passed when the algorithm has one) is the algorithm's ``local_correction``:
after every local step, params <- params - lr * correction. An algorithm that
``corrects_gradient`` passes ``gradient_correction`` instead (added to every gradient before the
step) and expects ``(trained params, mean corrected gradient)`` back.
"""

Schedule = Callable[[int], np.ndarray]
"""Round t -> the mixing matrix of the messages sent in round t (t = -1: before the first)."""


def as_schedule(mixing: np.ndarray | Schedule) -> Schedule:
    """A fixed matrix as the schedule that returns it every round."""
    if callable(mixing):
        return mixing
    fixed = np.asarray(mixing)
    return lambda t: fixed


def union_support(schedule: Schedule, rounds: int) -> np.ndarray:
    """``reach[i, j]``: node i hears a message node j sends in some round of the run.

    Messages are sent in rounds 0 .. rounds - 1; the diagonal is false.
    """
    reach = np.zeros(schedule(0).shape, dtype=bool)
    for t in range(rounds):
        reach |= schedule(t) != 0
    np.fill_diagonal(reach, False)
    return reach


def _row(w: np.ndarray, i: int) -> dict[int, float]:
    return {j: float(w[i, j]) for j in range(w.shape[0]) if j == i or w[i, j] != 0}


def run_gossip(
    algo: GossipAlgorithm,
    mixing: np.ndarray | Schedule,
    local_step: LocalStep,
    x0: Params | Sequence[Params],
    rounds: int,
    *,
    node_kwargs: Sequence[Mapping[str, Any]] | None = None,
    lost: Callable[[int, int, int], bool] | None = None,
    on_round: Callable[[int, list[Params]], None] | None = None,
    reach: np.ndarray | None = None,
    step_size: Callable[[int], float] | None = None,
) -> list[Params]:
    """Run ``rounds`` gossip rounds on all nodes; the combined parameters after the last round.

    ``mixing`` is one matrix for every round or a ``Schedule``. ``x0`` is one starting point for
    all nodes or one per node. ``node_kwargs[i]`` are extra keyword arguments for node i's
    combine (e.g. fedavg's ``num_examples``). ``lost(t, j, i)`` drops the message j sent to i in
    round t. ``on_round(t, combined)`` sees the combined parameters of every node before round
    t's training. ``reach`` (default: the union of the schedule's graphs over the run) is where
    a ``keeps_neighbour_copies`` algorithm's messages go. ``step_size(t)`` is the sum of the
    learning rates of round t's local steps, for a ``needs_step_size`` algorithm.
    """
    if algo.needs_step_size and step_size is None:
        raise ValueError(f"{algo.name} needs step_size: the sum of each round's learning rates")
    schedule = as_schedule(mixing)
    n = schedule(-1).shape[0]
    starts = [x0] * n if isinstance(x0, Mapping) else list(x0)
    params = [{k: np.array(v, copy=True) for k, v in p.items()} for p in starts]
    states = [algo.init_state(p) for p in params]
    extra = node_kwargs or [{}] * n
    if algo.keeps_neighbour_copies and reach is None:
        reach = union_support(schedule, rounds)
    inboxes: list[dict[int, Params]] = [{} for _ in range(n)]
    for t in range(rounds + 1):
        previous, now = schedule(t - 1), schedule(t)
        for i in range(n):
            kwargs = dict(extra[i])
            if algo.needs_out_degree:
                kwargs["out_degree"] = int(np.count_nonzero(now[:, i])) - int(now[i, i] != 0)
            if algo.needs_step_size:
                kwargs["step_size"] = step_size(t)
            params[i] = algo.combine(params[i], states[i], inboxes[i], _row(previous, i), i,
                                     **kwargs)  # fmt: skip
        if on_round is not None:
            on_round(t, params)
        if t == rounds:
            break
        hears = reach if algo.keeps_neighbour_copies else now != 0
        sent = []
        for i in range(n):
            correction = algo.local_correction(states[i])
            if algo.corrects_gradient:
                params[i], mean_gradient = local_step(i, params[i], t,
                                                      gradient_correction=correction)  # fmt: skip
                algo.observe_gradient(states[i], mean_gradient)
            elif correction is None:
                params[i] = local_step(i, params[i], t)
            else:
                params[i] = local_step(i, params[i], t, correction=correction)
            if not algo.communicates:
                sent.append({})
            elif algo.per_receiver_messages:
                receivers = tuple(k for k in range(n) if k != i and hears[k, i])
                sent.append(algo.message(params[i], states[i], receivers))
            else:
                sent.append(dict.fromkeys(range(n), algo.message(params[i], states[i])))
        inboxes = [
            {
                j: sent[j][i]
                for j in range(n)
                if j != i
                and hears[i, j]
                and algo.communicates
                and not (lost is not None and lost(t, j, i))
            }
            for i in range(n)
        ]
    return params
