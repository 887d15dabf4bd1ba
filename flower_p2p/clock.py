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
the activations in an order that respects it (``waves``). Faults are drawn per activation and
per message from the seed (``faults.ActivationFaults``) and change no duration, so they are
part of the schedule too: who is offline when, which copies never arrive, which calls raise.
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
            "relays, the trackers of gradient-tracking, K-GT and K-GT-grad) or a server "
            "(fedavg) need the rounds of mode=sync; centralized and local have no network to be "
            "async on",
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
    if cfg.straggler:
        raise ConfigError(
            "straggler", cfg.straggler,
            "0 with mode=async: a straggler does part of its local steps to meet a sync round's "
            "deadline, and async has no deadline; slow nodes are simulated by the clock "
            "(slow-fraction, slowdown, speed-spread)",
        )  # fmt: skip
    if cfg.fail_every and cfg.strategy == "ad-psgd":
        raise ConfigError(
            "fail-every", cfg.fail_every,
            "0 with strategy=ad-psgd: its averaging is atomic across two nodes' calls, and a "
            "call that raised would leave the pair half-averaged (node-dropout and link-drop "
            "are simulated: a failed exchange leaves both models as they were)",
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

    ``activation.index`` numbers the node's calls, and its reply is that node's message number
    ``index``. ``inbox[j] = k``: node j's message number k (async DSGD: the latest j had
    delivered by ``start``). ``age[j]``: how long ago that message was sent; ``lag[j]``: how many
    newer messages j had already sent that had not arrived yet (in flight). ``evals``: the
    evaluation points (indices into ``eval_points``) whose model is this call's combined one.
    ``train``: the call starts local work (it ends at ``activation.end``). ``event``: what the
    call is, for algorithms whose combine depends on it (AD-PSGD). ``broadcast``: the reply is
    sent to every out-neighbour at ``activation.end`` (async DSGD); otherwise messages travel
    only as inboxes, when they are combined (AD-PSGD's exchanges). ``fails``: the call raises
    (``fail-every``): it sends nothing and leaves the node's model as it was. ``transfers``
    (AD-PSGD): the models the call's exchange put on the network that it accounts for, as
    (sender, number, receiver, arrived): the one it received, or those a failed exchange sent
    (async DSGD's broadcasts are counted from the clock).
    """

    activation: Activation
    inbox: dict[int, int] = field(default_factory=dict)
    age: dict[int, float] = field(default_factory=dict)
    lag: dict[int, int] = field(default_factory=dict)
    evals: list[int] = field(default_factory=list)
    train: bool = True
    event: str | None = None
    broadcast: bool = True
    fails: bool = False
    transfers: list[tuple[int, int, int, bool]] = field(default_factory=list)

    def needs(self) -> set[tuple[int, int]]:
        """The messages (sender, number) this call combines or sends on."""
        return {*self.inbox.items(), *((j, k) for j, k, _, _ in self.transfers)}


class NoFaults:
    """Nothing goes wrong (``faults.ActivationFaults`` has the same three questions)."""

    def dropped(self, node: int, k: int) -> bool:
        """Whether the node is offline for its k-th activation."""
        return False

    def fails(self, node: int, k: int) -> bool:
        """Whether the node's k-th activation raises."""
        return False

    def lost(self, sender: int, receiver: int, k: int) -> bool:
        """Whether the sender's k-th message to the receiver is lost."""
        return False


class Schedule:
    """Every call of an async run, and the order they can run in.

    ``eval_points`` are the simulated times at which every node's model is evaluated (the final
    point, the horizon, is evaluated by the relay's final evaluation, not by a call).
    """

    final_event: str | None = None  # the ``event`` of the final evaluation's call

    def __init__(self, clock: Clock, horizon: float, eval_points: list[float],
                 faults=None) -> None:  # fmt: skip
        self.clock, self.horizon = clock, horizon
        self.eval_points = list(eval_points)
        self.faults = faults if faults is not None else NoFaults()
        self.plans: dict[tuple[int, int], Plan] = {}
        self.calls = [0] * clock.num_nodes  # the highest call number of each node
        self.dropped: list[Activation] = []  # activations a node was offline for
        self.lost: list[tuple[float, int]] = []  # (time sent, sender) of each message lost

    def final_inbox(self, node: int) -> dict[int, int]:
        """What ``node`` combines for the final evaluation, at the horizon."""
        raise NotImplementedError

    def waves(self, cuts: list[float] | tuple[float, ...] = ()) -> list[list[Plan]]:
        """The calls in batches that can each run at once, in simulated-time order.

        A call can run once its node's previous one and every message it combines have been
        computed. Each batch holds every call that is then ready (at most one per node); the
        earliest call left is always ready, so batches never stall.

        ``cuts``: simulated times where the run may be checkpointed. Every call that starts at
        or before a cut comes in a batch before any call that starts after it. Such a prefix
        is complete on its own: a call combines only messages that ended before it started.
        """
        done: set[tuple[int, int]] = set()
        # each node's calls in order (a dropped-out activation of async DSGD has none)
        queue: list[list[int]] = [[] for _ in range(self.clock.num_nodes)]
        for i, k in sorted(self.plans):
            queue[i].append(k)
        nxt = [0] * self.clock.num_nodes
        batches = []
        for bound in [*sorted(cuts), math.inf]:
            while True:
                batch = []
                for i in range(self.clock.num_nodes):
                    if nxt[i] == len(queue[i]):
                        continue
                    plan = self.plans[(i, queue[i][nxt[i]])]
                    if started_by(plan, bound) and plan.needs() <= done:
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


def started_by(plan: Plan, t: float) -> bool:
    """Whether the call starts at or before simulated time ``t`` (equal within rounding)."""
    return plan.activation.start <= t + _EPS * max(1.0, abs(t)) if math.isfinite(t) else True


class AsyncSchedule(Schedule):
    """Async DSGD: each activation combines the latest message each in-neighbour delivered.

    Node i's k-th activation runs over [(k-1) c_i, k c_i] and is its call number k; a node's
    model at an evaluation point t is the one it combined at its latest activation start <= t.
    With faults, an activation the node is offline for has no call (nothing combined, trained,
    evaluated or sent), one that fails sends nothing, and a lost copy never arrives: each
    receiver combines the latest message that did.
    """

    def __init__(self, clock: Clock, horizon: float, eval_points: list[float],
                 faults=None) -> None:  # fmt: skip
        super().__init__(clock, horizon, eval_points, faults)
        self.count = [self._activations_by(c, horizon) for c in clock.compute]
        self.calls = list(self.count)
        # messages never sent: the activation was dropped, or raised
        self.silent: set[tuple[int, int]] = set()
        acts = [Activation(i, k, (k - 1) * c, k * c) for i, c in enumerate(clock.compute)
                for k in range(1, self.count[i] + 1)]  # fmt: skip
        for act in acts:
            if self.faults.dropped(act.node, act.index):
                self.dropped.append(act)
                self.silent.add((act.node, act.index))
            elif self.faults.fails(act.node, act.index):
                self.silent.add((act.node, act.index))
        for act in acts:
            if not self.faults.dropped(act.node, act.index):
                self.plans[(act.node, act.index)] = self._plan(act)
        for act in acts:
            if (act.node, act.index) not in self.silent:
                self.lost.extend((act.end, act.node) for i in clock.out_neighbours[act.node]
                                 if self.faults.lost(act.node, i, act.index))  # fmt: skip
        for q, t in enumerate(self.eval_points):
            if t >= horizon - _EPS:
                continue  # the final evaluation
            for i, c in enumerate(clock.compute):
                # latest start <= t; a node idle at t after its last activation: that activation
                k = min(self._activations_by(c, t) + 1, self.count[i])
                if (i, k) in self.plans:  # an offline node is not evaluated
                    self.plans[(i, k)].evals.append(q)

    @staticmethod
    def _activations_by(compute: float, t: float) -> int:
        """Activations a node with this compute time has ended by time t."""
        k = math.floor(t / compute + _EPS)
        return max(k, 0)

    def _arrives(self, sender: int, receiver: int, k: int) -> bool:
        return (sender, k) not in self.silent and not self.faults.lost(sender, receiver, k)

    def delivered(self, sender: int, receiver: int, t: float) -> int:
        """The latest of ``sender``'s messages to ``receiver`` delivered by time t (0: none)."""
        lat = self.clock.latency[(sender, receiver)]
        k = min(self._activations_by(self.clock.compute[sender], t - lat), self.count[sender])
        while k and not self._arrives(sender, receiver, k):
            k -= 1
        return k

    def _plan(self, act: Activation) -> Plan:
        plan = Plan(act, fails=(act.node, act.index) in self.silent)
        for j in self.clock.in_neighbours[act.node]:
            k = self.delivered(j, act.node, act.start)
            if k == 0:
                continue
            plan.inbox[j] = k
            plan.age[j] = act.start - k * self.clock.compute[j]
            sent = min(self._activations_by(self.clock.compute[j], act.start), self.count[j])
            plan.lag[j] = sum(self._arrives(j, act.node, m) for m in range(k + 1, sent + 1))
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

    Faults keep every duration as it is. A node offline for an activation (``node-dropout``)
    trains nothing in it, starts no exchange at its end, answers none while it lasts and is
    not evaluated then. An exchange happens only if both of its messages arrive (the averaging
    is atomic); otherwise the ``finish`` call combines nothing and adds the node's own update,
    and the partner has no call.
    """

    final_event = "final"

    def __init__(self, clock: Clock, horizon: float, eval_points: list[float],
                 seed: int, faults=None) -> None:  # fmt: skip
        super().__init__(clock, horizon, eval_points, faults)
        n = clock.num_nodes
        acts: list[list[Activation]] = [[] for _ in range(n)]
        partners: dict[tuple[int, int], int] = {}
        for i in range(n):
            t, k = 0.0, 1
            while True:
                p = partner(seed, i, k, clock.out_neighbours[i])
                end = t + clock.compute[i] + clock.latency[(i, p)] + clock.latency[(p, i)]
                if end > horizon + _EPS * max(1.0, horizon):
                    break
                acts[i].append(Activation(i, k, t, end))
                partners[(i, k)] = p
                t, k = end, k + 1
        self.count = [len(a) for a in acts]  # activations that end by the horizon
        offline = [[a for a in acts[i] if self.faults.dropped(i, a.index)] for i in range(n)]
        self.dropped = [a for node in offline for a in node]

        def online(i: int, t: float) -> bool:
            return not any(a.start <= t < a.end for a in offline[i])

        def trains(i: int, k: int) -> bool:  # activation k exists and the node is there for it
            return k <= self.count[i] and not self.faults.dropped(i, k)

        version = [1] * n  # the message number of each node's model now
        made_at = [[0.0, 0.0] for _ in range(n)]  # made_at[i][v]: when message v was made
        for i in range(n):
            end = acts[i][0].end if acts[i] else 0.0
            self._add(Plan(Activation(i, 1, 0.0, end), train=trains(i, 1), event="start",
                           broadcast=False))  # fmt: skip
        for t, i, k in sorted((a.end, a.node, a.index) for node in acts for a in node):
            p = partners[(i, k)]
            vi, vp = version[i], version[p]
            nxt = acts[i][k].end if k < self.count[i] else t  # the activation this call starts
            finish = Plan(Activation(i, vi + 1, t, nxt), train=trains(i, k + 1), event="finish",
                          broadcast=False)  # fmt: skip
            version[i] += 1
            made_at[i].append(t)
            self._add(finish)
            if self.faults.dropped(i, k):
                continue  # offline: nothing sent
            request_lost = self.faults.lost(i, p, k)
            request = online(p, t) and not request_lost
            reply_lost = request and self.faults.lost(p, i, k)
            reply = request and not reply_lost
            self.lost.extend((t, j) for j, lost in ((i, request_lost), (p, reply_lost)) if lost)
            if not reply:  # the exchange failed: the node adds its own update only
                finish.transfers.append((i, vi, p, request))
                if request:
                    finish.transfers.append((p, vp, i, False))
                continue
            # each of the two calls accounts for the model it received
            finish.inbox, finish.age, finish.lag = {p: vp}, {p: t - made_at[p][vp]}, {p: 0}
            finish.transfers.append((p, vp, i, True))
            self._add(Plan(Activation(p, vp + 1, t, t), inbox={i: vi},
                           age={i: t - made_at[i][vi]}, lag={i: 0}, train=False, event="pair",
                           broadcast=False, transfers=[(i, vi, p, True)]))  # fmt: skip
            version[p] += 1
            made_at[p].append(t)
        for q, tq in enumerate(self.eval_points):
            if tq >= horizon - _EPS:
                continue
            for i in range(n):  # the node's latest call at or before tq
                if not online(i, tq):
                    continue
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
    """The async schedule of ``cfg``'s strategy and faults (cfg: ExperimentConfig)."""
    from flower_p2p.faults import ActivationFaults

    faults = ActivationFaults.of(cfg)
    if cfg.strategy == "ad-psgd":
        return PairwiseSchedule(clock, horizon, eval_points, cfg.seed, faults)
    return AsyncSchedule(clock, horizon, eval_points, faults)


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
