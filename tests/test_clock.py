"""The simulated clock and the async schedule: a hand-worked schedule, bounds, refusals.

The async relay runs whatever ``AsyncSchedule`` says, so the schedule is checked here against
answers worked out by hand, and against properties that must hold for any speeds and latencies.
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from flower_p2p.clock import (
    ASYNC_STRATEGIES,
    AsyncSchedule,
    Clock,
    PairwiseSchedule,
    run_clock,
    speed_factors,
    sync_round_time,
)
from flower_p2p.config import ExperimentConfig
from flower_p2p.faults import ActivationFaults
from flower_p2p.registry import ConfigError
from strategies import strategy_names


def _clock(compute, edges, latency) -> Clock:
    """A clock over an undirected graph; ``latency``: a number, or {(sender, receiver): s}."""
    n = len(compute)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    nbrs = tuple(tuple(sorted(g.neighbors(i))) for i in range(n))
    lat = {(j, i): (latency[(j, i)] if isinstance(latency, dict) else latency)
           for j in range(n) for i in nbrs[j]}  # fmt: skip
    return Clock(tuple(compute), lat, nbrs, nbrs)


def test_three_nodes_against_a_hand_worked_schedule():
    # a path 0 - 1 - 2; node i computes for i + 1 s; every link takes 0.5 s; 6 s in all
    sched = AsyncSchedule(_clock([1.0, 2.0, 3.0], [(0, 1), (1, 2)], 0.5), 6.0, [0.0, 3.0, 6.0])
    assert sched.count == [6, 3, 2]  # activations that end by 6 s
    inbox = {key: plan.inbox for key, plan in sched.plans.items()}
    # node 0 hears node 1, whose k-th message (sent at 2k) arrives at 2k + 0.5
    assert [inbox[(0, k)] for k in range(1, 7)] == [{}, {}, {}, {1: 1}, {1: 1}, {1: 2}]
    # node 1 hears 0 (sent at k, arrives k + 0.5) and 2 (sent at 3k, arrives 3k + 0.5)
    assert [inbox[(1, k)] for k in (1, 2, 3)] == [{}, {0: 1}, {0: 3, 2: 1}]
    assert [inbox[(2, k)] for k in (1, 2)] == [{}, {1: 1}]
    # staleness: age since sent, and newer messages of that sender still in flight
    assert sched.plans[(0, 5)].age == {1: 2.0} and sched.plans[(0, 5)].lag == {1: 1}
    assert sched.plans[(0, 6)].age == {1: 1.0} and sched.plans[(0, 6)].lag == {1: 0}
    assert sched.plans[(1, 3)].age == {0: 1.0, 2: 1.0}
    assert sched.plans[(1, 3)].lag == {0: 1, 2: 0}
    # at 3 s each node's model is the one it combined at its latest start <= 3 s
    evals = {key: plan.evals for key, plan in sched.plans.items() if plan.evals}
    assert evals == {(0, 1): [0], (1, 1): [0], (2, 1): [0], (0, 4): [1], (1, 2): [1],
                     (2, 2): [1]}  # fmt: skip
    assert [sched.final_inbox(i) for i in range(3)] == [{1: 2}, {0: 5, 2: 1}, {1: 2}]
    waves = [[(p.activation.node, p.activation.index) for p in w] for w in sched.waves()]
    assert waves == [[(0, 1), (1, 1), (2, 1)], [(0, 2), (1, 2), (2, 2)], [(0, 3)],
                     [(0, 4), (1, 3)], [(0, 5)], [(0, 6)]]  # fmt: skip


def test_equal_speeds_and_no_latency_is_the_sync_schedule():
    # activation k combines exactly what sync round k combines: the neighbours' round k - 1
    sched = AsyncSchedule(_clock([2.0] * 5, [(i, (i + 1) % 5) for i in range(5)], 0.0), 20.0,
                          [0.0, 6.0, 12.0, 20.0])  # fmt: skip
    assert sched.count == [10] * 5
    for (i, k), plan in sched.plans.items():
        want = {} if k == 1 else {(i - 1) % 5: k - 1, (i + 1) % 5: k - 1}
        assert plan.inbox == want
        assert all(lag == 0 for lag in plan.lag.values())
    assert len(sched.waves()) == 10  # one wave per round, every node in it


@pytest.mark.parametrize("seed", range(6))
def test_any_speeds_and_latencies_keep_staleness_bounded_and_inboxes_neighbour_only(seed):
    rng = np.random.default_rng(seed)
    n = 7
    g = nx.connected_watts_strogatz_graph(n, 4, 0.3, seed=seed)
    compute = list(rng.uniform(0.5, 4.0, n))
    lat = {(j, i): float(rng.uniform(0.0, 3.0)) for j, i in g.edges}
    lat.update({(i, j): float(rng.uniform(0.0, 3.0)) for j, i in g.edges})
    clock = _clock(compute, g.edges, lat)
    horizon = 30.0
    sched = AsyncSchedule(clock, horizon, [0.0, 10.0, 20.0, 30.0])
    for (i, k), plan in sched.plans.items():
        act = plan.activation
        assert act.start == pytest.approx((k - 1) * compute[i]) and act.end <= horizon + 1e-9
        assert set(plan.inbox) <= set(clock.in_neighbours[i])  # neighbours only
        for j, m in plan.inbox.items():
            sent = m * compute[j]
            assert sent + lat[(j, i)] <= act.start + 1e-9  # delivered before it is combined
            assert lat[(j, i)] - 1e-9 <= plan.age[j] <= compute[j] + lat[(j, i)] + 1e-9
            assert 0 <= plan.lag[j] <= math.ceil(lat[(j, i)] / compute[j])
        # any neighbour whose first message had arrived is in the inbox
        for j in clock.in_neighbours[i]:
            assert (j in plan.inbox) == (compute[j] + lat[(j, i)] <= act.start + 1e-9)
    # a node never goes back to an older message of a neighbour
    for i in range(n):
        for j in clock.in_neighbours[i]:
            seen = [sched.plans[(i, k)].inbox.get(j, 0) for k in range(1, sched.count[i] + 1)]
            assert seen == sorted(seen)
    # waves: every activation once, one per node, after everything it combines
    done = {}
    for w, wave in enumerate(sched.waves()):
        nodes = [p.activation.node for p in wave]
        assert len(nodes) == len(set(nodes))
        for p in wave:
            key = (p.activation.node, p.activation.index)
            assert all(done[(j, m)] < w for j, m in p.inbox.items())
            assert p.activation.index == 1 or done[(key[0], key[1] - 1)] < w
            done[key] = w
    assert len(done) == len(sched.plans)


def test_sync_round_waits_for_the_slowest_node_and_its_slowest_link():
    clock = _clock([1.0, 2.0, 3.0], [(0, 1), (1, 2)], {(0, 1): 5.0, (1, 0): 0.1, (1, 2): 0.2,
                                                         (2, 1): 0.3})  # fmt: skip
    assert clock.round_time == pytest.approx(6.0)  # node 0's 1 s + its 5 s link


def test_speed_profile_slows_the_right_number_of_nodes_from_the_seed():
    a = speed_factors(16, 3, 0.25, 4.0, 0.0)
    assert sorted(a) == [1.0] * 12 + [4.0] * 4
    assert np.array_equal(a, speed_factors(16, 3, 0.25, 4.0, 0.0))
    assert not np.array_equal(a, speed_factors(16, 4, 0.25, 4.0, 0.0))
    spread = speed_factors(16, 3, 0.25, 4.0, 0.5)
    assert np.all(spread > 0) and len(set(spread)) == 16


def test_run_clock_uses_the_config():
    cfg = ExperimentConfig(num_nodes=4, local_steps=3, step_time=0.5, slow_fraction=0.25,
                           slowdown=2.0, latency=0.25)  # fmt: skip
    clock = run_clock(cfg)
    assert sorted(clock.compute) == [1.5, 1.5, 1.5, 3.0]
    assert clock.round_time == 3.25 == sync_round_time(cfg, clock)
    fedavg = cfg.replace(strategy="fedavg")
    assert sync_round_time(fedavg, run_clock(fedavg)) == 3.5  # up to the server and back
    assert run_clock(cfg.replace(strategy="centralized")) is None


@pytest.mark.parametrize("strategy", sorted(set(strategy_names()) - set(ASYNC_STRATEGIES)))
def test_async_refuses_strategies_that_need_rounds(strategy):
    extra = {"optimizer": "sgd"} if strategy == "qg-dsgdm" else {}
    with pytest.raises(ConfigError, match="mode=async") as err:
        ExperimentConfig.from_run_config({"mode": "async", "strategy": strategy, **extra})
    assert err.value.key == "strategy"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"topology": "one-peer-exponential"}, "topology"),
        ({"straggler": 0.1}, "straggler"),
        ({"strategy": "ad-psgd", "fail-every": 3}, "fail-every"),
    ],
)
def test_async_refuses_what_it_does_not_simulate(change, key):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_run_config({"mode": "async", **change})
    assert err.value.key == key


@pytest.mark.parametrize("strategy", ASYNC_STRATEGIES)
def test_async_simulates_dropouts_lost_messages_and_checkpoints(strategy):
    change = {"node-dropout": 0.1, "link-drop": 0.1, "checkpoint-every": 3}
    if strategy == "dsgd":
        change["fail-every"] = 3
    cfg = ExperimentConfig.from_run_config({"mode": "async", "strategy": strategy, **change})
    assert cfg.node_dropout == 0.1 and cfg.checkpoint_every == 3


# ---- faults on the async clock -----------------------------------------------------------------


def _random_clock(seed: int, n: int = 7) -> Clock:
    rng = np.random.default_rng(seed)
    g = nx.connected_watts_strogatz_graph(n, 4, 0.3, seed=seed)
    lat = {(j, i): float(rng.uniform(0.0, 3.0)) for j, i in g.edges}
    lat.update({(i, j): float(rng.uniform(0.0, 3.0)) for j, i in g.edges})
    return _clock(list(rng.uniform(0.5, 4.0, n)), g.edges, lat)


@pytest.mark.parametrize("seed", range(4))
def test_async_dsgd_faults_each_receiver_combines_the_latest_message_that_arrived(seed):
    clock = _random_clock(seed)
    faults = ActivationFaults(seed, node_dropout=0.2, link_drop=0.3, fail_every=4)
    horizon = 40.0
    sched = AsyncSchedule(clock, horizon, [0.0, 10.0, 20.0, 40.0], faults)
    clean = AsyncSchedule(clock, horizon, [0.0, 10.0, 20.0, 40.0])
    assert sched.count == clean.count  # faults change no duration
    silent = set()
    for i in range(clock.num_nodes):
        for k in range(1, sched.count[i] + 1):
            dropped, fails = faults.dropped(i, k), faults.fails(i, k)
            assert ((i, k) in sched.plans) == (not dropped)  # offline: no call at all
            if not dropped:
                assert sched.plans[(i, k)].fails == fails
                assert sched.plans[(i, k)].activation == clean.plans[(i, k)].activation
            if dropped or fails:
                silent.add((i, k))
    assert silent and len(silent) < sum(sched.count)  # both happen, not everywhere
    assert {(a.node, a.index) for a in sched.dropped} == {
        k for k in silent if faults.dropped(*k)}  # fmt: skip

    def arrived(j, i, t):  # every message of j that reached i by t, worked out from scratch
        return [m for m in range(1, sched.count[j] + 1)
                if m * clock.compute[j] + clock.latency[(j, i)] <= t + 1e-9
                and (j, m) not in silent and not faults.lost(j, i, m)]  # fmt: skip

    lost = 0
    for (i, _), plan in sched.plans.items():
        for j in clock.in_neighbours[i]:
            got = arrived(j, i, plan.activation.start)
            assert plan.inbox.get(j) == (max(got) if got else None)
            if got:  # in flight: sent by then, newer, neither silent nor lost
                sent = [m for m in range(got[-1] + 1, sched.count[j] + 1)
                        if m * clock.compute[j] <= plan.activation.start + 1e-9
                        and (j, m) not in silent and not faults.lost(j, i, m)]  # fmt: skip
                assert plan.lag[j] == len(sent)
    for j in range(clock.num_nodes):
        for m in range(1, sched.count[j] + 1):
            if (j, m) not in silent:
                lost += sum(faults.lost(j, i, m) for i in clock.out_neighbours[j])
    assert len(sched.lost) == lost > 0
    for i in range(clock.num_nodes):
        for j in clock.in_neighbours[i]:
            got = arrived(j, i, horizon)
            assert sched.final_inbox(i).get(j) == (max(got) if got else None)
    # an offline node is not evaluated; every other node is, once per point before the end
    for q, t in enumerate([0.0, 10.0, 20.0]):
        carriers = [key for key, p in sched.plans.items() if q in p.evals]
        want = [
            i
            for i, c in enumerate(clock.compute)
            if not faults.dropped(i, min(math.floor(t / c + 1e-9) + 1, sched.count[i]))
        ]
        assert sorted(i for i, _ in carriers) == want


@pytest.mark.parametrize("seed", range(4))
def test_ad_psgd_faults_keep_durations_and_make_exchanges_all_or_nothing(seed):
    clock = _random_clock(seed)
    faults = ActivationFaults(seed, node_dropout=0.2, link_drop=0.3)
    sched = PairwiseSchedule(clock, 40.0, [0.0, 20.0, 40.0], seed, faults)
    clean = PairwiseSchedule(clock, 40.0, [0.0, 20.0, 40.0], seed)
    assert sched.count == clean.count  # faults change no duration
    offline = {i: [(a.start, a.end) for a in sched.dropped if a.node == i]
               for i in range(clock.num_nodes)}  # fmt: skip
    assert sum(map(len, offline.values())) > 0
    pairs = {(p.activation.node, p.activation.start, next(iter(p.inbox)))
             for p in sched.plans.values() if p.event == "pair"}  # fmt: skip
    failed = 0
    for plan in sched.plans.values():
        if plan.event != "finish":
            continue
        i, t = plan.activation.node, plan.activation.start
        if plan.inbox:  # an exchange: the partner has its pair call, both ways arrived
            (p,) = plan.inbox
            assert (p, t, i) in pairs
            assert not any(s <= t < e for s, e in offline[p])
            assert plan.transfers == [(p, plan.inbox[p], i, True)]
        elif plan.transfers:  # the request, and the reply if the partner got it: one was lost
            failed += 1
            (request, *reply) = plan.transfers
            assert request[0] == i and request[2] != i and not plan.transfers[-1][3]
            assert all(r[0] == request[2] and r[2] == i for r in reply)
        else:  # the activation it ends was one the node was offline for: nothing sent
            failed += 1
            assert any(e == t for _, e in offline[i])
    assert failed > 0 and len(pairs) > 0
    assert len(pairs) + failed == sum(1 for p in sched.plans.values() if p.event == "finish")
    for (i, _), plan in sched.plans.items():
        if plan.train:  # an offline node trains nothing
            assert not any(s <= plan.activation.start < e for s, e in offline[i])


@pytest.mark.parametrize("seed", range(3))
def test_waves_cut_at_checkpoint_times_run_everything_before_them_first(seed):
    clock = _random_clock(seed)
    sched = AsyncSchedule(clock, 40.0, [0.0, 40.0], ActivationFaults(seed, 0.2, 0.2, 3))
    cuts = [7.5, 13.0, 29.0]
    waves = sched.waves(cuts)
    assert sorted((p.activation.node, p.activation.index) for w in waves for p in w) == sorted(
        sched.plans)  # fmt: skip
    for t in cuts:  # the calls up to a cut are a prefix of the waves
        flags = [all(p.activation.start <= t for p in w) for w in waves]
        assert flags == sorted(flags, reverse=True)
        assert not any(p.activation.start <= t for w in waves[flags.count(True) :] for p in w)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"mode": "later"}, "mode"),
        ({"step-time": 0}, "step-time"),
        ({"slow-fraction": 1.0}, "slow-fraction"),
        ({"slowdown": 0.5}, "slowdown"),
        ({"latency": -1}, "latency"),
        ({"speed-spread": -0.1}, "speed-spread"),
        ({"latency-spread": 0.5, "topology": "random-matching"}, "latency-spread"),
    ],
)
def test_bad_clock_values_are_refused_by_key(change, key):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_run_config(change)
    assert err.value.key == key
