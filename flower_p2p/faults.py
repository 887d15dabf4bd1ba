"""Faults injected into a simulated run: node dropout, lost messages, stragglers, failing nodes.

The network (the relay, or the plain loop standing in for it) decides every fault of a round from
one generator seeded by (seed, round) only, so a run is reproducible, a resumed run draws the same
faults as an uninterrupted one, and no generator state needs saving.

Per round ``rnd`` (1-based; ``rnd = num-rounds + 1`` is the final evaluation):

* ``node-dropout``: the node is offline for the round: it gets no message (so it neither combines,
  evaluates, trains nor sends), and its state stays as it was. Its neighbours hear nothing from
  it in the next round.
* ``link-drop``: each directed message sent in round ``rnd - 1`` is lost on its way to its
  receiver in round ``rnd`` independently with this probability (also in the final evaluation).
* ``straggler``: the node trains only ``straggler-fraction`` of its local steps,
  ``max(1, round(fraction * steps))``, then combines and sends as usual.
* ``fail-every`` (a testing aid): node ``FAIL_NODE``'s training raises in every round divisible
  by it. A node whose ClientApp raises counts as dropped for that round.

The final evaluation has no dropouts and no stragglers: it measures, it does not train. The
``centralized`` reference has no faults (it is one model, not a network).

``mode=async`` has no rounds: its faults are drawn per activation and per message instead
(``ActivationFaults``), from (seed, node, activation) only, and the clock's schedule is built
around them before anything trains (``flower_p2p.clock``): a dropped-out node is offline for a
whole activation, a lost message is one copy of a node's message to one receiver, and
``fail-every`` makes node ``FAIL_NODE``'s every k-th activation raise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import TypeVar

import numpy as np
from flwr.common import log

# Separates the fault generator from other (seed, round) generators (e.g. random matchings).
_FAULT_STREAM = 0xFA17
# The node that ``fail-every`` makes fail.
FAIL_NODE = 0

M = TypeVar("M")


class InjectedFault(RuntimeError):
    """Raised by a node's training when ``fail-every`` says so (testing aid)."""


@dataclass(frozen=True)
class FaultPlan:
    """What goes wrong in one round; ``lost`` holds (sender, receiver) pairs."""

    dropped: frozenset[int] = frozenset()
    stragglers: frozenset[int] = frozenset()
    lost: frozenset[tuple[int, int]] = frozenset()


def fault_plan(cfg, rnd: int) -> FaultPlan:  # cfg: ExperimentConfig
    """The faults of round ``rnd``, a function of (seed, round, config) only.

    Every draw is made whatever the probabilities, so turning one fault on never changes which
    nodes another fault hits.
    """
    if cfg.strategy == "centralized":  # the reference is one model, not a network
        return FaultPlan()
    n = cfg.num_nodes
    rng = np.random.default_rng([cfg.seed, _FAULT_STREAM, rnd])
    u_drop, u_slow, u_link = rng.random(n), rng.random(n), rng.random((n, n))
    if rnd > cfg.num_rounds:  # the final evaluation: nobody trains, so nobody drops or lags
        dropped, slow = frozenset(), frozenset()
    else:
        dropped = frozenset(int(i) for i in np.flatnonzero(u_drop < cfg.node_dropout))
        slow = frozenset(int(i) for i in np.flatnonzero(u_slow < cfg.straggler)) - dropped
    # u_link[i, j]: the message from j to i (the diagonal is drawn but is not a link)
    receivers, senders = np.nonzero((u_link < cfg.link_drop) & ~np.eye(n, dtype=bool))
    lost = frozenset((int(j), int(i)) for i, j in zip(receivers, senders, strict=True))
    return FaultPlan(dropped=dropped, stragglers=slow, lost=lost)


def deliver(
    plan: FaultPlan, receiver: int, senders: Iterable[int], last_out: Mapping[int, M]
) -> tuple[dict[int, M], int]:
    """Inbox of ``receiver``: its senders' last messages minus lost links; and how many were lost.

    Only messages that exist count as lost: a sender that sent nothing (dropped, failed or
    first round) loses nothing.
    """
    inbox: dict[int, M] = {}
    lost = 0
    for j in senders:
        if j not in last_out:
            continue
        if (j, receiver) in plan.lost:
            lost += 1
            continue
        inbox[j] = last_out[j]
    return inbox, lost


def round_steps(cfg, num_samples: int, fraction: float = 1.0) -> int:  # cfg: ExperimentConfig
    """How many optimizer steps a node takes this round (``local-epochs`` passes counted out)."""
    steps = local_steps(cfg, num_samples, fraction)
    if steps > 0:
        return steps
    return cfg.local_epochs * math.ceil(num_samples / cfg.batch_size)


def local_steps(cfg, num_samples: int, fraction: float = 1.0) -> int:  # cfg: ExperimentConfig
    """Optimizer steps of one round (0: ``local-epochs`` full passes); stragglers take a fraction.

    The centralized reference takes every node's steps itself: the same optimizer-step budget.
    """
    steps = cfg.local_steps * (cfg.num_nodes if cfg.strategy == "centralized" else 1)
    if fraction >= 1.0:
        return steps
    if steps <= 0:
        steps = cfg.local_epochs * math.ceil(num_samples / cfg.batch_size)
    return max(1, round(fraction * steps))


def check_injected_failure(cfg, node: int, rnd: int) -> None:  # cfg: ExperimentConfig
    """Raise ``InjectedFault`` where ``fail-every`` asks for it (a real failure of the node).

    ``rnd``: the round, or in ``mode=async`` the node's activation.

    The ``centralized`` reference is exempt: its single node is node ``FAIL_NODE`` too, but it is
    one model, not a network, and has no faults (as in ``fault_plan``).
    """
    if cfg.strategy == "centralized":
        return
    if cfg.fail_every and node == FAIL_NODE and rnd % cfg.fail_every == 0:
        where = "activation" if cfg.mode == "async" else "round"
        raise InjectedFault(f"injected failure (fail-every={cfg.fail_every}) in {where} {rnd}")


_DROPOUT, _LINK = 1, 2


@dataclass(frozen=True)
class ActivationFaults:
    """The faults of ``mode=async``: per activation of a node, and per message on a link.

    Each draw comes from its own generator seeded by (seed, node or link, activation), so
    whether one activation or message is hit does not depend on any other, on the wave order,
    or on where a resumed run started.
    """

    seed: int = 0
    node_dropout: float = 0.0
    link_drop: float = 0.0
    fail_every: int = 0

    @classmethod
    def of(cls, cfg) -> ActivationFaults:  # cfg: ExperimentConfig
        """The async faults ``cfg`` asks for."""
        return cls(cfg.seed, cfg.node_dropout, cfg.link_drop, cfg.fail_every)

    def dropped(self, node: int, k: int) -> bool:
        """Node ``node`` is offline for its k-th activation (``node-dropout``)."""
        return (
            bool(self.node_dropout) and _uniform(self.seed, _DROPOUT, node, k) < self.node_dropout
        )

    def fails(self, node: int, k: int) -> bool:
        """Node ``node``'s k-th activation raises (``fail-every``, a testing aid)."""
        return bool(self.fail_every) and node == FAIL_NODE and k % self.fail_every == 0

    def lost(self, sender: int, receiver: int, k: int) -> bool:
        """The copy of ``sender``'s k-th message to ``receiver`` is lost (``link-drop``)."""
        return bool(self.link_drop) and (
            _uniform(self.seed, _LINK, sender, receiver, k) < self.link_drop)  # fmt: skip


def _uniform(seed: int, *key: int) -> float:
    return float(np.random.default_rng([seed, _FAULT_STREAM, *key]).random())


@dataclass
class FaultLog:
    """Counts of every fault that happened, and the first error of each node, logged once."""

    node_dropouts: int = 0
    link_drops: int = 0
    stragglers: int = 0
    client_errors: int = 0
    failed_nodes: dict[int, int] = field(default_factory=dict)
    # each failed node's first error (not saved in checkpoints: for messages only)
    first_errors: dict[int, str] = field(default_factory=dict, compare=False)

    def planned(self, plan: FaultPlan) -> None:
        """Count the round's dropouts and stragglers (link drops are counted on delivery)."""
        self.node_dropouts += len(plan.dropped)
        self.stragglers += len(plan.stragglers)

    def error(self, node: int, rnd: int, reason: str) -> None:
        """A node failed in round ``rnd``: count it, log only its first failure."""
        self.client_errors += 1
        count = self.failed_nodes.get(node, 0) + 1
        self.failed_nodes[node] = count
        self.first_errors.setdefault(node, reason)
        if count == 1:
            log(
                WARNING,
                "node %d failed in round %d and counts as dropped for that round (further "
                "failures of this node are only counted in summary.json): %s",
                node, rnd, reason,
            )  # fmt: skip

    def first_error(self, node: int) -> str:
        """The first error ``node`` reported (empty if none)."""
        return self.first_errors.get(node, "")

    def to_dict(self) -> dict:
        """The counts for summary.json (JSON keys are strings)."""
        return {
            "node_dropouts": self.node_dropouts,
            "link_drops": self.link_drops,
            "stragglers": self.stragglers,
            "client_errors": self.client_errors,
            "failed_nodes": {str(k): v for k, v in sorted(self.failed_nodes.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> FaultLog:
        """Inverse of ``to_dict`` (used when resuming)."""
        return cls(
            node_dropouts=d["node_dropouts"],
            link_drops=d["link_drops"],
            stragglers=d["stragglers"],
            client_errors=d["client_errors"],
            failed_nodes={int(k): v for k, v in d["failed_nodes"].items()},
        )
