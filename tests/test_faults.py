"""Faults decided from (seed, round): reproducible, at the configured rates, delivered per link."""

import os

import numpy as np
import pytest

from flower_p2p.config import ExperimentConfig
from flower_p2p.faults import (
    FAIL_NODE,
    FaultLog,
    InjectedFault,
    check_injected_failure,
    deliver,
    fault_plan,
    local_steps,
)
from flower_p2p.node import CENTRALIZED_NODE
from flower_p2p.registry import ConfigError
from flower_p2p.topology import topology_for
from strategies import DSGD

FAULTY = ExperimentConfig(num_nodes=8, num_rounds=400, node_dropout=0.1, link_drop=0.2,
                          straggler=0.3)  # fmt: skip


def test_plan_depends_only_on_seed_and_round():
    assert fault_plan(FAULTY, 7) == fault_plan(FAULTY, 7)
    assert fault_plan(FAULTY, 7) != fault_plan(FAULTY, 8)
    assert fault_plan(FAULTY, 7) != fault_plan(FAULTY.replace(seed=1), 7)
    # one fault's probability does not move which nodes another fault hits
    assert fault_plan(FAULTY, 7).dropped == fault_plan(FAULTY.replace(link_drop=0.0), 7).dropped


def test_rates_match_the_probabilities():
    plans = [fault_plan(FAULTY, r) for r in range(1, FAULTY.num_rounds + 1)]
    n, rounds = FAULTY.num_nodes, len(plans)
    assert np.mean([len(p.dropped) for p in plans]) / n == pytest.approx(0.1, abs=0.02)
    assert np.mean([len(p.lost) for p in plans]) / (n * (n - 1)) == pytest.approx(0.2, abs=0.02)
    # stragglers are drawn among the nodes that did not drop
    assert sum(len(p.stragglers) for p in plans) / (n * rounds) == pytest.approx(0.27, abs=0.03)
    assert all(not (p.dropped & p.stragglers) for p in plans)


def test_no_faults_by_default_nor_in_the_final_evaluation():
    assert fault_plan(ExperimentConfig(), 3) == fault_plan(ExperimentConfig(seed=5), 3)
    assert not fault_plan(ExperimentConfig(), 3).lost
    final = fault_plan(FAULTY, FAULTY.num_rounds + 1)
    assert not final.dropped and not final.stragglers and final.lost  # messages still get lost
    centralized = FAULTY.replace(strategy="centralized")
    assert fault_plan(centralized, 3) == fault_plan(ExperimentConfig(), 3)


def test_deliver_drops_lost_links_only_and_counts_them():
    plan = fault_plan(FAULTY, 2)
    lost_to_0 = {j for j, i in plan.lost if i == 0}
    last_out = {j: f"msg{j}" for j in range(1, 8) if j != 5}  # node 5 sent nothing
    inbox, lost = deliver(plan, 0, range(1, 8), last_out)
    assert set(inbox) == set(last_out) - lost_to_0
    assert lost == len(lost_to_0 & set(last_out)) > 0
    assert all(inbox[j] == f"msg{j}" for j in inbox)


def test_stragglers_take_a_fraction_of_their_steps():
    cfg = ExperimentConfig(local_steps=4, batch_size=32)
    assert local_steps(cfg, 100) == 4 and local_steps(cfg, 100, 0.5) == 2
    assert local_steps(cfg, 100, 0.1) == 1  # at least one step
    epochs = cfg.replace(local_steps=0, local_epochs=2)
    assert local_steps(epochs, 100) == 0  # full epochs: ceil(100 / 32) = 4 batches each
    assert local_steps(epochs, 100, 0.5) == 4
    assert local_steps(cfg.replace(strategy="centralized"), 100) == 4 * cfg.num_nodes


def test_injected_failure_hits_one_node_every_k_rounds():
    cfg = ExperimentConfig(fail_every=3)
    with pytest.raises(InjectedFault):
        check_injected_failure(cfg, FAIL_NODE, 6)
    check_injected_failure(cfg, FAIL_NODE, 5)
    check_injected_failure(cfg, FAIL_NODE + 1, 6)
    check_injected_failure(ExperimentConfig(), FAIL_NODE, 6)


def test_injected_failure_spares_the_centralized_reference():
    # Its single node is node FAIL_NODE too, but the reference is one model with no faults.
    cfg = ExperimentConfig(strategy="centralized", num_nodes=4, fail_every=3)
    assert CENTRALIZED_NODE == FAIL_NODE
    check_injected_failure(cfg, CENTRALIZED_NODE, 6)


def test_fault_log_counts_every_error_and_survives_a_round_trip():
    faults = FaultLog()
    for rnd in (3, 6, 9):
        faults.error(0, rnd, "boom")
    faults.error(2, 4, "boom")
    assert faults.client_errors == 4 and faults.failed_nodes == {0: 3, 2: 1}
    assert FaultLog.from_dict(faults.to_dict()) == faults


@pytest.mark.parametrize(
    ("key", "value"),
    [("node-dropout", 1.0), ("link-drop", -0.1), ("straggler", 1.5),
     ("straggler-fraction", 0.0), ("fail-every", -1), ("checkpoint-every", -2)],
)  # fmt: skip
def test_bad_fault_keys_are_refused_by_name(key, value):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_run_config({key: value})
    assert str(err.value).startswith(f"{key}={value!r}")


def test_missing_weight_stays_with_the_node_so_expected_mixing_is_doubly_stochastic():
    """DSGD's rule for lost messages: E[realised W] stays symmetric, hence doubly stochastic.

    Renormalising over the messages that arrived instead would make the expected matrix
    depend on each node's degree, and no longer symmetric (on non-regular graphs).
    """
    cfg = ExperimentConfig(num_nodes=6, topology="star", node_dropout=0.0, link_drop=0.3)
    topo = topology_for(cfg)
    algo, n, draws = DSGD(), cfg.num_nodes, 2000
    expected = np.zeros((n, n))
    for rnd in range(1, draws + 1):
        plan = fault_plan(cfg, rnd)
        last_out = {j: {"x": np.eye(n)[j]} for j in range(n)}  # basis vectors reveal W's rows
        for i in range(n):
            inbox, _ = deliver(plan, i, topo.neighbours[i], last_out)
            row = algo.combine({"x": np.eye(n)[i]}, {}, inbox, topo.row(i), i)["x"]
            assert row.sum() == pytest.approx(1.0)  # every realised W is row-stochastic
            expected[i] += row / draws
    assert np.allclose(expected, expected.T, atol=0.02)
    assert np.allclose(expected.sum(axis=0), 1.0, atol=0.03)


@pytest.mark.skipif(
    os.environ.get("FLOWER_P2P_SLOW") != "1",
    reason="minutes on 2 cores (two converged runs); set FLOWER_P2P_SLOW=1 to run it",
)
def test_dsgd_with_10_percent_link_drops_and_dropout_ends_within_2_points():
    """The issue's check on a reduced digits experiment that converges (the plain loop).

    Measured on the 2-core machine: 95.07 % fault-free, 95.69 % with the faults (12 dropouts,
    13 lost messages). The default experiment itself is measured in the README. Too slow for
    every CI run (18 min on the shared machine under heavy load, over 9.5 min at load 4).
    """
    from sim.loop import run_plain

    base = ExperimentConfig(num_nodes=4, num_rounds=20, depth=1, img_size=16, patch_size=8,
                            local_steps=0, local_epochs=1, eval_every=20)  # fmt: skip
    clean = run_plain(base)
    faulty = run_plain(base.replace(node_dropout=0.1, link_drop=0.1))
    assert faulty["faults"]["node_dropouts"] > 0 and faulty["faults"]["link_drops"] > 0
    assert clean["final_mean"] > 0.9  # converged, so the comparison means something
    assert abs(faulty["final_mean"] - clean["final_mean"]) <= 0.02
