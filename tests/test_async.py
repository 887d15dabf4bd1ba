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

from flower_p2p.clock import AsyncSchedule, run_clock
from flower_p2p.results import read_jsonl

SHARED_FIELDS = ("round", "node", "sim_time", "accuracy", "loss", "train_loss", "bytes_sent",
                 "bytes_received", "network_bytes")  # fmt: skip


def _schedule(name: str) -> AsyncSchedule:
    cfg = case_config(name)
    clock = run_clock(cfg)
    rounds = sorted({q for q in range(cfg.num_rounds) if q % cfg.eval_every == 0}
                    | {cfg.num_rounds})  # fmt: skip
    return AsyncSchedule(clock, cfg.num_rounds * clock.round_time,
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


def test_every_activation_combines_exactly_what_the_clock_delivered(small_runs):
    name = "dsgd-async-slow-nodes"
    sched = _schedule(name)
    log = json.loads((small_runs(name) / "relay_log.json").read_text())
    sent_by = {(r["node"], r["activation"]): r["out"] for r in log["replies"]}
    trains = [m for m in log["sent"] if m["kind"] == "train"]
    assert sorted((m["node"], m["activation"]) for m in trains) == sorted(sched.plans)
    assert len(sent_by) == len(sched.plans)  # every activation replied with its message
    for msg in trains:
        plan = sched.plans[(msg["node"], msg["activation"])]
        inbox = {int(j): h for j, h in msg["inbox"].items()}
        assert set(inbox) == set(plan.inbox)  # in-neighbours only, and each that delivered
        for j, digest in inbox.items():
            assert digest == sent_by[(j, plan.inbox[j])], (msg["node"], msg["activation"], j)
        assert set(msg["keys"]) == {"config", *(f"in:{j}" for j in inbox)}
    finals = [m for m in log["sent"] if m["kind"] == "evaluate"]
    assert len(finals) == 4
    for msg in finals:
        want = sched.final_inbox(msg["node"])
        assert {int(j): h for j, h in msg["inbox"].items()} == {
            j: sent_by[(j, k)] for j, k in want.items()
        }


def test_slow_nodes_run_less_and_the_records_say_so(small_runs):
    name = "dsgd-async-slow-nodes"
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
            bound = max(clock.compute[j] + clock.latency[(j, m["node"])]
                        for j in clock.in_neighbours[m["node"]])  # fmt: skip
            assert 0 < m["staleness_mean_s"] <= m["staleness_max_s"] <= bound + 1e-9
    done = {n: sum(m["activations"] for m in metrics if m["node"] == n) for n in range(4)}
    assert done == dict(enumerate(sched.count))
    slow = max(range(4), key=lambda n: clock.compute[n])
    assert all(done[slow] * 3 <= done[n] for n in range(4) if n != slow)
    # bytes: one message per activation to each neighbour, all of the same size
    last = {m["node"]: m for m in metrics if m["round"] == cfg.num_rounds}
    per_message = last[slow]["bytes_sent"] / (2 * done[slow])
    assert all(last[n]["bytes_sent"] == 2 * done[n] * per_message for n in range(4))


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
