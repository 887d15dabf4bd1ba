"""``mode=async`` through Flower's simulation engine: the schedule, and nothing else, is run.

The small runs (``small_runs.CASES``) include two async runs: equal speeds without latency
(whose schedule is the sync one, so its numbers must be the sync run's, exactly) and a quarter
of the nodes 4x slower with spread speeds and link latencies. The relay's messages are watched
(``relay_capture_app``): every activation must combine exactly the messages the clock says
were delivered to it, from its neighbours only.
"""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest
from small_runs import case_config

from flower_p2p.clock import Schedule, run_clock, schedule_for
from flower_p2p.results import read_jsonl

SHARED_FIELDS = ("round", "node", "sim_time", "accuracy", "loss", "train_loss", "bytes_sent",
                 "bytes_received", "network_bytes")  # fmt: skip


SLOW = ["dsgd-async-slow-nodes", "ad-psgd-slow-nodes"]


def _schedule(name: str) -> Schedule:
    cfg = case_config(name)
    clock = run_clock(cfg)
    rounds = sorted({q for q in range(cfg.num_rounds) if q % cfg.eval_every == 0}
                    | {cfg.num_rounds})  # fmt: skip
    return schedule_for(cfg, clock, cfg.num_rounds * clock.round_time,
                        [q * clock.round_time for q in rounds])  # fmt: skip


def test_equal_speeds_without_latency_computes_the_sync_run(small_runs):
    sync = read_jsonl(small_runs("dsgd") / "metrics.jsonl")
    run = read_jsonl(small_runs("dsgd-async-equal-speeds") / "metrics.jsonl")
    assert [{k: m[k] for k in SHARED_FIELDS} for m in run] == [
        {k: m[k] for k in SHARED_FIELDS} for m in sync
    ]
    consensus = [
        [r["consensus_distance"] for r in read_jsonl(small_runs(n) / "network.jsonl")]
        for n in ("dsgd", "dsgd-async-equal-speeds")
    ]
    # the same models; summed in another order (sync: as replies arrive), so to rounding
    assert consensus[1] == [None if c is None else pytest.approx(c, rel=1e-9) for c in consensus[0]]
    assert any(c is not None for c in consensus[0])


@pytest.mark.parametrize("name", SLOW)
def test_every_call_combines_exactly_what_the_clock_delivered(small_runs, name):
    sched = _schedule(name)
    log = json.loads((small_runs(name) / "relay_log.json").read_text())
    sent_by = {(r["node"], r["activation"]): r["out"] for r in log["replies"]}
    trains = [m for m in log["sent"] if m["kind"] == "train"]
    assert sorted((m["node"], m["activation"]) for m in trains) == sorted(sched.plans)
    assert set(sched.plans) <= set(sent_by)  # every call replied with its message
    for msg in trains:
        plan = sched.plans[(msg["node"], msg["activation"])]
        inbox = {int(j): h for j, h in msg["inbox"].items()}
        assert set(inbox) == set(plan.inbox)  # in-neighbours only, and each that delivered
        for j, digest in inbox.items():
            assert digest == sent_by[(j, plan.inbox[j])], (msg["node"], msg["activation"], j)
        assert set(msg["keys"]) == {"config", *(f"in:{j}" for j in inbox)}
    # AD-PSGD: both calls of an exchange, each with the other's model from just before
    pairs = [p for p in sched.plans.values() if p.event == "pair"]
    assert bool(pairs) == (case_config(name).strategy == "ad-psgd")
    finals = [m for m in log["sent"] if m["kind"] == "evaluate"]
    assert len(finals) == 4
    for msg in finals:
        want = sched.final_inbox(msg["node"])
        assert {int(j): h for j, h in msg["inbox"].items()} == {
            j: sent_by[(j, k)] for j, k in want.items()
        }


def _oldest(strategy: str, clock, j: int, i: int) -> float:
    """The oldest a message of j combined at i can be."""
    if strategy != "ad-psgd":
        return clock.compute[j] + clock.latency[(j, i)]
    return max(clock.compute[j] + clock.latency[(j, p)] + clock.latency[(p, j)]
               for p in clock.out_neighbours[j])  # fmt: skip


@pytest.mark.parametrize("name", SLOW)
def test_slow_nodes_run_less_and_the_records_say_so(small_runs, name):
    cfg, sched = case_config(name), _schedule(name)
    clock = sched.clock
    metrics = read_jsonl(small_runs(name) / "metrics.jsonl")
    assert sorted((m["round"], m["node"]) for m in metrics) == [
        (r, n) for r in range(cfg.num_rounds + 1) for n in range(cfg.num_nodes)
    ]
    for m in metrics:
        assert m["sim_time"] == pytest.approx(m["round"] * clock.round_time)
        assert (m["accuracy"] is not None) == (m["round"] % cfg.eval_every == 0)
        if m["staleness_max_s"] is not None:
            # DSGD: a message is at most one activation and a link old. AD-PSGD: a partner's
            # model changes at least once per activation of the partner (its own exchange)
            bound = max(_oldest(cfg.strategy, clock, j, m["node"])
                        for j in clock.in_neighbours[m["node"]])  # fmt: skip
            assert 0 <= m["staleness_mean_s"] <= m["staleness_max_s"] <= bound + 1e-9
    done = {n: sum(m["activations"] for m in metrics if m["node"] == n) for n in range(4)}
    assert done == dict(enumerate(sched.count))
    slow = max(range(4), key=lambda n: clock.compute[n])
    # 4x slower, speeds spread: DSGD 36, 8, 33, 28 activations; AD-PSGD (its exchanges' round
    # trips added) 23, 7, 23, 18
    assert all(done[slow] * 2.5 <= done[n] for n in range(4) if n != slow)
    # bytes: all messages have the same size. DSGD: one per activation to each of the two ring
    # neighbours; AD-PSGD: one each time its model is combined by the other node of an exchange
    if cfg.strategy == "ad-psgd":
        sends = {n: sum(j == n for p in sched.plans.values() for j in p.inbox) for n in range(4)}
    else:
        sends = {n: 2 * done[n] for n in range(4)}
    last = {m["node"]: m for m in metrics if m["round"] == cfg.num_rounds}
    per_message = last[slow]["bytes_sent"] / sends[slow]
    assert per_message > 1e5
    assert all(last[n]["bytes_sent"] == sends[n] * per_message for n in range(4))


def _burn(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def test_same_config_and_seed_give_identical_files_under_load(small_runs, tmp_path):
    from sim.engine import run_experiment

    name = "dsgd-async-slow-nodes"
    first = small_runs(name)
    # two busy processes make the actors finish in another order than the first run's
    burners = [multiprocessing.Process(target=_burn, args=(time.monotonic() + 120,))
               for _ in range(2)]  # fmt: skip
    for b in burners:
        b.start()
    try:
        again = run_experiment(case_config(name, str(tmp_path / "again")))
    finally:
        for b in burners:
            b.terminate()
    for f in ("metrics.jsonl",):
        assert (again / f).read_bytes() == (first / f).read_bytes()
    net = [[{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(d / "network.jsonl")]
           for d in (first, again)]  # fmt: skip
    assert net[0] == net[1]
