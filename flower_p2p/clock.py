"""The simulated clock: compute time per node, latency per link, and the async schedule.

In ``mode=async`` the clock also fixes the whole schedule of who computes when and hears what.

Nothing here touches Flower, torch or the machine's own clock. Every duration is a function of
(config, seed, partition sizes), so a run's schedule, and therefore its results, are the same
whatever the load of the machine that computes it.

* A node's **activation** is one unit of local work: ``round_steps`` optimizer steps, each taking
  ``step-time`` simulated seconds times the node's slowdown (``slow-fraction`` of the nodes,
  drawn from the seed, are ``slowdown`` times slower; ``speed-spread`` multiplies every node's
  time by a log-normal factor).
* A **link** j -> i delivers a message ``latency`` seconds after it is sent (times a log-normal
  factor per directed link with ``latency-spread``).
* **Sync**: a round lasts until the slowest node's message reached its slowest neighbour,
  ``round_time = max_j (compute_j + max_i latency_ji)``; round r ends at ``r * round_time``.
* **Async**: node i's k-th activation runs over ``[(k-1) c_i, k c_i]`` with no barrier. At its
  start it combines its own model with the latest message of each in-neighbour delivered by
  then; at its end it sends. A run lasts as long as the sync run of ``num-rounds`` would
  (``horizon = num_rounds * round_time``): only activations that end by then happen.

Since no duration depends on what a message holds, the whole async schedule is known before any
node trains: ``AsyncSchedule`` lists each activation, the message it combines from each
neighbour, the staleness of each, and which evaluations it carries. The relay only has to run
the activations in an order that respects it (``waves``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from flower_p2p.registry import ConfigError
from flower_p2p.topology import Topology

MODES = ("sync", "async")
# Times are sums and products of a few floats; two events this close are the same instant.
_EPS = 1e-9

_SPEED_STREAM, _LATENCY_STREAM = 0x5EED, 0x1A7E
# Gossip algorithms that run without rounds: they combine whatever latest messages arrived.
ASYNC_STRATEGIES = ("dsgd", "ad-psgd")


def check_clock(cfg) -> None:  # cfg: ExperimentConfig
    """The clock keys, and what ``mode=async`` supports; refused with the reason, by key."""
    if cfg.mode not in MODES:
        raise ConfigError("mode", cfg.mode, f"one of {', '.join(MODES)}")
    if not cfg.step_time > 0:
        raise ConfigError("step-time", cfg.step_time, "simulated seconds per local step, > 0")
    if not 0.0 <= cfg.slow_fraction < 1.0:
        raise ConfigError("slow-fraction", cfg.slow_fraction, "a fraction of the nodes in [0, 1)")
    if not cfg.slowdown >= 1.0:
        raise ConfigError("slowdown", cfg.slowdown, "how many times slower a slow node is, >= 1")
    for key in ("speed-spread", "latency", "latency-spread"):
        value = getattr(cfg, key.replace("-", "_"))
        if not value >= 0.0:
            raise ConfigError(key, value, "a value >= 0")
    from flower_p2p.schedules import is_schedule

    if cfg.latency_spread and is_schedule(cfg.topology):
        raise ConfigError(
            "latency-spread", cfg.latency_spread,
            f"0 with topology={cfg.topology}: per-link latencies belong to fixed links, and a "
            "per-round graph's links change (latency sets one latency for every link)",
        )  # fmt: skip
    if cfg.strategy == "ad-psgd" and cfg.mode != "async":
        raise ConfigError(
            "mode", cfg.mode,
            "async with strategy=ad-psgd: its pairwise averaging happens when a node's activation "
            "ends, at its own pace; in rounds it would be gossip with one random neighbour "
            "(dsgd on topology=random-matching)",
        )  # fmt: skip
    if cfg.mode == "sync":
        return
    if cfg.strategy not in ASYNC_STRATEGIES:
        raise ConfigError(
            "strategy", cfg.strategy,
            f"one of {', '.join(ASYNC_STRATEGIES)} with mode=async: an async node combines the "
            "latest message each neighbour delivered, at its own pace. Algorithms whose nodes "
            "must hear every message in order (CHOCO's copies, push-sum's mass, RelaySum's "
            "relays, the trackers of gradient-tracking and K-GT) or a server (fedavg) need the "
            "rounds of mode=sync; centralized and local have no network to be async on",
        )  # fmt: skip
    if is_schedule(cfg.topology):
        raise ConfigError(
            "topology", cfg.topology,
            "a static graph with mode=async: a per-round graph changes at round boundaries, "
            "and async nodes have no common rounds",
        )  # fmt: skip
    if cfg.strategy == "ad-psgd":
        from flower_p2p.schedules import topology_at

        if topology_at(cfg, 1).graph.is_directed():
            raise ConfigError(
                "topology", cfg.topology,
                "an undirected graph with strategy=ad-psgd: a pair averages both ways, so each "
                "of its links must carry messages in both directions",
            )  # fmt: skip
    for key in ("node-dropout", "link-drop", "straggler", "fail-every", "checkpoint-every"):
        value = getattr(cfg, key.replace("-", "_"))
        if value:
            raise ConfigError(
                key, value,
                "0 with mode=async: faults and checkpoints are not simulated on the async clock "
                "yet (slow nodes are: slow-fraction, slowdown, speed-spread)",
            )  # fmt: skip


def speed_factors(num_nodes: int, seed: int, slow_fraction: float, slowdown: float,
                  spread: float) -> np.ndarray:  # fmt: skip
    """Each node's compute-time multiplier (1: nominal), drawn from the seed only.

    ``round(slow_fraction * num_nodes)`` nodes, chosen uniformly, take ``slowdown`` times longer;
    ``spread`` > 0 multiplies every node by exp(N(0, spread^2)).
    """
    rng = np.random.default_rng([seed, _SPEED_STREAM])
    factors = np.ones(num_nodes)
    slow = rng.permutation(num_nodes)[: round(slow_fraction * num_nodes)]
    factors[slow] = slowdown
    lognormal = rng.normal(0.0, 1.0, num_nodes)  # drawn always: spread only scales it
    return factors * np.exp(spread * lognormal)


def link_latency(seed: int, sender: int, receiver: int, latency: float, spread: float) -> float:
    """Simulated seconds a message takes from ``sender`` to ``receiver`` (per directed link)."""
    if latency == 0.0:
        return 0.0
    z = np.random.default_rng([seed, _LATENCY_STREAM, sender, receiver]).normal()
    return float(latency * math.exp(spread * z))


@dataclass(frozen=True)
class Clock:
    """Compute time per activation of each node and the latency of each directed link."""

    compute: tuple[float, ...]
    latency: dict[tuple[int, int], float]  # (sender, receiver) -> seconds, over the graph's links
    out_neighbours: tuple[tuple[int, ...], ...]
    in_neighbours: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, cfg, topology: Topology, steps: list[int]) -> Clock:  # cfg: ExperimentConfig
        """The clock of a run: ``steps[i]`` optimizer steps per activation of node i."""
        factors = speed_factors(cfg.num_nodes, cfg.seed, cfg.slow_fraction, cfg.slowdown,
                                cfg.speed_spread)  # fmt: skip
        compute = tuple(float(s * cfg.step_time * f) for s, f in zip(steps, factors, strict=True))
        latency = {
            (j, i): link_latency(cfg.seed, j, i, cfg.latency, cfg.latency_spread)
            for j in range(cfg.num_nodes)
            for i in topology.out_neighbours[j]
        }
        return cls(compute, latency, tuple(topology.out_neighbours),
                   tuple(topology.in_neighbours))  # fmt: skip

    @property
    def num_nodes(self) -> int:
        """How many nodes the clock times."""
        return len(self.compute)

    @cached_property
    def round_time(self) -> float:
        """One synchronous round: every node computes, and every message reaches its receiver."""
        return max(
            c + max((self.latency[(j, i)] for i in self.out_neighbours[j]), default=0.0)
            for j, c in enumerate(self.compute)
        )


@dataclass(frozen=True)
class Activation:
    """Node ``node``'s ``index``-th (1-based) local work, over [start, end] simulated seconds."""

    node: int
    index: int
    start: float
    end: float


@dataclass
class Plan:
    """One call of a node by the relay: what it combines, and what it is evaluated for.

    ``activation.index`` counts the node's calls, and its reply is that node's message number
    ``index``. ``inbox[j] = k``: node j's message number k (async DSGD: the latest j had
    delivered by ``start``). ``age[j]``: how long ago that message was sent; ``lag[j]``: how many
    newer messages j had already sent that had not arrived yet (in flight). ``evals``: the
    evaluation points (indices into ``eval_points``) whose model is this call's combined one.
    ``train``: the call starts local work (it ends at ``activation.end``). ``event``: what the
    call is, for algorithms whose combine depends on it (AD-PSGD). ``broadcast``: the reply is
    sent to every out-neighbour at ``activation.end`` (async DSGD); otherwise messages travel
    only as inboxes, when they are combined (AD-PSGD's exchanges).
    """

    activation: Activation
    inbox: dict[int, int] = field(default_factory=dict)
    age: dict[int, float] = field(default_factory=dict)
    lag: dict[int, int] = field(default_factory=dict)
    evals: list[int] = field(default_factory=list)
    train: bool = True
    event: str | None = None
    broadcast: bool = True


class Schedule:
    """Every call of an async run, and the order they can run in.

    ``eval_points`` are the simulated times at which every node's model is evaluated (the final
    point, the horizon, is evaluated by the relay's final evaluation, not by a call).
    """

    final_event: str | None = None  # the ``event`` of the final evaluation's call

    def __init__(self, clock: Clock, horizon: float, eval_points: list[float]) -> None:
        self.clock, self.horizon = clock, horizon
        self.eval_points = list(eval_points)
        self.plans: dict[tuple[int, int], Plan] = {}
        self.calls = [0] * clock.num_nodes  # calls per node (plans (i, 1) ... (i, calls[i]))

    def final_inbox(self, node: int) -> dict[int, int]:
        """What ``node`` combines for the final evaluation, at the horizon."""
        raise NotImplementedError

    def waves(self) -> list[list[Plan]]:
        """The calls in batches that can each run at once, in simulated-time order.

        A call can run once its node's previous one and every message it combines have been
        computed. Each batch holds every call that is then ready (at most one per node); the
        earliest call left is always ready, so batches never stall.
        """
        done: set[tuple[int, int]] = set()
        nxt = [1] * self.clock.num_nodes
        batches = []
        while True:
            batch = []
            for i in range(self.clock.num_nodes):
                k = nxt[i]
                if k > self.calls[i]:
                    continue
                plan = self.plans[(i, k)]
                if all((j, m) in done for j, m in plan.inbox.items()):
                    batch.append(plan)
            if not batch:
                break
            for plan in batch:
                done.add((plan.activation.node, plan.activation.index))
                nxt[plan.activation.node] += 1
            batches.append(batch)
        if len(done) != len(self.plans):  # cannot happen with compute > 0; never silently
            raise RuntimeError("async schedule stalled: a call waits on a later one")
        return batches


class AsyncSchedule(Schedule):
    """Async DSGD: each activation combines the latest message each in-neighbour delivered.

    Node i's k-th activation is its k-th call, over [(k-1) c_i, k c_i]; a node's model at an
    evaluation point t is the one it combined at its latest activation start <= t.
    """

    def __init__(self, clock: Clock, horizon: float, eval_points: list[float]) -> None:
        super().__init__(clock, horizon, eval_points)
        self.count = [self._activations_by(c, horizon) for c in clock.compute]
        self.calls = list(self.count)
        for i, c in enumerate(clock.compute):
            for k in range(1, self.count[i] + 1):
                act = Activation(i, k, (k - 1) * c, k * c)
                self.plans[(i, k)] = self._plan(act)
        for q, t in enumerate(self.eval_points):
            if t >= horizon - _EPS:
                continue  # the final evaluation
            for i, c in enumerate(clock.compute):
                # latest start <= t; a node idle at t after its last activation: that activation
                k = min(self._activations_by(c, t) + 1, self.count[i])
                if k >= 1:
                    self.plans[(i, k)].evals.append(q)

    @staticmethod
    def _activations_by(compute: float, t: float) -> int:
        """Activations a node with this compute time has ended by time t."""
        k = math.floor(t / compute + _EPS)
        return max(k, 0)

    def delivered(self, sender: int, receiver: int, t: float) -> int:
        """The latest of ``sender``'s messages to ``receiver`` delivered by time t (0: none)."""
        lat = self.clock.latency[(sender, receiver)]
        k = self._activations_by(self.clock.compute[sender], t - lat)
        return min(k, self.count[sender])

    def _plan(self, act: Activation) -> Plan:
        plan = Plan(act)
        for j in self.clock.in_neighbours[act.node]:
            k = self.delivered(j, act.node, act.start)
            if k == 0:
                continue
            plan.inbox[j] = k
            plan.age[j] = act.start - k * self.clock.compute[j]
            sent = min(self._activations_by(self.clock.compute[j], act.start), self.count[j])
            plan.lag[j] = sent - k
        return plan

    def final_inbox(self, node: int) -> dict[int, int]:
        """The latest message of each in-neighbour delivered by the horizon."""
        inbox = {}
        for j in self.clock.in_neighbours[node]:
            k = self.delivered(j, node, self.horizon)
            if k:
                inbox[j] = k
        return inbox


_PARTNER_STREAM = 0xAD95


def partner(seed: int, node: int, k: int, neighbours: tuple[int, ...]) -> int:
    """The neighbour ``node`` averages with at the end of its k-th activation (uniform)."""
    rng = np.random.default_rng([seed, _PARTNER_STREAM, node, k])
    return neighbours[int(rng.integers(len(neighbours)))]


class PairwiseSchedule(Schedule):
    """AD-PSGD (Lian et al., 2018): pairwise averaging at the end of every activation.

    Node i computes its local steps on the model it held when the activation started; at the
    end it averages atomically with one neighbour p drawn from the seed (both take
    (x_i + x_p) / 2), then adds its own update. The exchange needs p's model to come back, so an
    activation lasts ``compute_i + latency(i, p) + latency(p, i)``. Every node's model changes at
    its own exchanges and at those a neighbour starts with it, so each exchange is two calls at
    the same simulated time: ``finish`` at i (partner's model in, its update applied, the next
    activation started) and ``pair`` at p (i's model in, nothing trained). Both combine the
    model the other held just before: message number k of a node is its model after its k-th
    call, and a node's first call (``start``, at 0) starts its first activation. A node's model
    at an evaluation point is the one after its latest call at or before it.
    """

    final_event = "final"

    def __init__(self, clock: Clock, horizon: float, eval_points: list[float],
                 seed: int) -> None:  # fmt: skip
        super().__init__(clock, horizon, eval_points)
        n = clock.num_nodes
        ends: list[list[float]] = [[] for _ in range(n)]
        events = []  # (time, node, activation, partner)
        for i in range(n):
            t, k = 0.0, 1
            while True:
                p = partner(seed, i, k, clock.out_neighbours[i])
                end = t + clock.compute[i] + clock.latency[(i, p)] + clock.latency[(p, i)]
                if end > horizon + _EPS * max(1.0, horizon):
                    break
                events.append((end, i, k, p))
                ends[i].append(end)
                t, k = end, k + 1
        self.count = [len(e) for e in ends]  # activations that end by the horizon
        version = [1] * n  # the message number of each node's model now
        made_at = [[0.0, 0.0] for _ in range(n)]  # made_at[i][v]: when message v was made
        for i in range(n):
            end = ends[i][0] if ends[i] else 0.0
            self._add(Plan(Activation(i, 1, 0.0, end), train=bool(ends[i]), event="start",
                           broadcast=False))  # fmt: skip
        for t, i, k, p in sorted(events):
            vi, vp = version[i], version[p]
            nxt = ends[i][k] if k < len(ends[i]) else t  # the activation this call starts
            self._add(Plan(Activation(i, vi + 1, t, nxt), inbox={p: vp},
                           age={p: t - made_at[p][vp]}, lag={p: 0}, train=k < len(ends[i]),
                           event="finish", broadcast=False))  # fmt: skip
            self._add(Plan(Activation(p, vp + 1, t, t), inbox={i: vi},
                           age={i: t - made_at[i][vi]}, lag={i: 0}, train=False, event="pair",
                           broadcast=False))  # fmt: skip
            version[i], version[p] = vi + 1, vp + 1
            made_at[i].append(t)
            made_at[p].append(t)
        for q, tq in enumerate(self.eval_points):
            if tq >= horizon - _EPS:
                continue
            for i in range(n):  # the node's latest call at or before tq
                k = max(v for v in range(1, self.calls[i] + 1) if made_at[i][v] <= tq + _EPS)
                self.plans[(i, k)].evals.append(q)

    def _add(self, plan: Plan) -> None:
        node = plan.activation.node
        self.calls[node] += 1
        assert plan.activation.index == self.calls[node]
        self.plans[(node, plan.activation.index)] = plan

    def final_inbox(self, node: int) -> dict[int, int]:
        """Nothing: at the horizon a node's model is what its last call left it."""
        return {}


def schedule_for(cfg, clock: Clock, horizon: float, eval_points: list[float]) -> Schedule:
    """The async schedule of ``cfg``'s strategy (cfg: ExperimentConfig)."""
    if cfg.strategy == "ad-psgd":
        return PairwiseSchedule(clock, horizon, eval_points, cfg.seed)
    return AsyncSchedule(clock, horizon, eval_points)


def run_clock(cfg) -> Clock | None:  # cfg: ExperimentConfig
    """The clock of a run's nodes (None for the centralized reference: no network to time).

    Steps per activation are ``round_steps`` of each node's partition (partitions are loaded
    only when ``local-steps=0`` makes the steps depend on their sizes).
    """
    if cfg.strategy == "centralized":
        return None
    from flower_p2p.faults import round_steps
    from flower_p2p.schedules import topology_at

    if cfg.local_steps > 0:
        steps = [round_steps(cfg, 0)] * cfg.num_nodes
    else:
        from flower_p2p.data import load_data

        steps = [round_steps(cfg, len(p)) for p in load_data(cfg).partitions]
    return Clock.build(cfg, topology_at(cfg, 1), steps)


def sync_round_time(cfg, clock: Clock) -> float:  # cfg: ExperimentConfig
    """Simulated seconds of one synchronous round of this run.

    ``fedavg`` goes through a server: the slowest upload, then the broadcast back.
    """
    if cfg.strategy == "fedavg":
        slowest_link = max(clock.latency.values(), default=0.0)
        return max(clock.compute) + 2 * slowest_link
    return clock.round_time
