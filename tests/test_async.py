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


SLOW = ["dsgd-async-slow-nodes-faults", "ad-psgd-slow-nodes-faults"]


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
    failed = {key for key, p in sched.plans.items() if p.fails}
    assert set(sched.plans) - failed <= set(sent_by)  # every call replied with its message
    assert not failed & set(sent_by)  # ... but those that raised (fail-every)
    assert bool(failed) == bool(case_config(name).fail_every)
    assert sched.dropped and sched.lost  # the faults happened
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
    evaluated = {(q, p.activation.node) for p in sched.plans.values() if not p.fails
                 for q in p.evals}  # fmt: skip
    for m in metrics:
        assert m["sim_time"] == pytest.approx(m["round"] * clock.round_time)
        # evaluated at each point, unless offline or failing then (the final: every node)
        q = m["round"] // cfg.eval_every
        want = m["round"] == cfg.num_rounds or (
            m["round"] % cfg.eval_every == 0 and (q, m["node"]) in evaluated
        )
        assert (m["accuracy"] is not None) == want, m
        if m["staleness_max_s"] is not None:
            # DSGD: a message is at most one activation and a link old, or older by the
            # activations whose copies were lost or never sent. AD-PSGD: a partner's model
            # changes at least once per activation of the partner (its own exchange), bar faults
            bound = max(_oldest(cfg.strategy, clock, j, m["node"])
                        for j in clock.in_neighbours[m["node"]])  # fmt: skip
            assert 0 <= m["staleness_mean_s"] <= m["staleness_max_s"]
            if not (cfg.node_dropout or cfg.link_drop):
                assert m["staleness_max_s"] <= bound + 1e-9
    done = {n: sum(m["activations"] for m in metrics if m["node"] == n) for n in range(4)}
    trained = {n: sum(p.train and not p.fails for (i, _), p in sched.plans.items() if i == n)
               for n in range(4)}  # fmt: skip
    assert done == trained
    slow = max(range(4), key=lambda n: clock.compute[n])
    # 4x slower, speeds spread: the others run at least 2.5 times as many activations
    assert all(sched.count[slow] * 2.5 <= sched.count[n] for n in range(4) if n != slow)
    # bytes: all messages have the same size. DSGD: one per activation that sent, to each of
    # the two ring neighbours (lost copies count: they were sent); AD-PSGD: each model an
    # exchange put on the network
    if cfg.strategy == "ad-psgd":
        sends = {n: 0 for n in range(4)}
        for p in sched.plans.values():
            for j, *_ in p.transfers:
                sends[j] += 1
    else:
        sends = {n: 2 * sum(not p.fails for (i, _), p in sched.plans.items() if i == n)
                 for n in range(4)}  # fmt: skip
    last = {m["node"]: m for m in metrics if m["round"] == cfg.num_rounds}
    per_message = last[slow]["bytes_sent"] / sends[slow]
    assert per_message > 1e5
    assert all(last[n]["bytes_sent"] == sends[n] * per_message for n in range(4))


def _burn(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def test_same_config_and_seed_give_identical_files_under_load_and_hosted(small_runs, tmp_path):
    """Rerun beside a busy process, and with 2 graph nodes per SuperNode (nodes-per-supernode
    changes how messages travel, not what is computed): the same files."""
    from sim.engine import run_experiment

    name = "dsgd-async-slow-nodes-faults"
    first = small_runs(name)
    # a busy process makes the actors finish in another order than the first run's
    burners = [multiprocessing.Process(target=_burn, args=(time.monotonic() + 120,))]
    for b in burners:
        b.start()
    try:
        again = run_experiment(case_config(name, str(tmp_path / "again")).replace(
            nodes_per_supernode=2))  # fmt: skip
    finally:
        for b in burners:
            b.terminate()
    for f in ("metrics.jsonl",):
        assert (again / f).read_bytes() == (first / f).read_bytes()
    net = [[{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(d / "network.jsonl")]
           for d in (first, again)]  # fmt: skip
    assert net[0] == net[1]
