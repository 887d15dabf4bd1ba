"""What a node mixes to depends on its neighbours' messages and on nothing else."""

import numpy as np
from flwr.app import ArrayRecord

from flower_p2p.server_app import neighbour_inbox
from flower_p2p.topology import build_topology
from flower_p2p.wire import to_record
from strategies import create_strategy


def _messages(n, rng):
    return {
        j: {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4)}
        for j in range(n)
    }


def _mix(topo, node, msgs, own):
    row = topo.row(node)
    relayed = neighbour_inbox(
        node, topo.neighbours[node], {j: to_record(m) for j, m in msgs.items()}
    )
    inbox = {j: {k: a.numpy() for k, a in rec.items()} for j, rec in relayed.items()}
    return create_strategy("dsgd").combine(own, {}, inbox, row, node)


def test_relay_delivers_exactly_the_neighbours_messages():
    topo = build_topology("ring", "metropolis-hastings", 8, seed=0)
    last_out = {j: ArrayRecord() for j in range(8)}
    assert sorted(neighbour_inbox(3, topo.neighbours[3], last_out)) == [2, 4]
    # a neighbour that sent nothing is simply absent
    del last_out[4]
    assert sorted(neighbour_inbox(3, topo.neighbours[3], last_out)) == [2]


def test_non_neighbour_change_does_not_move_the_mix_neighbour_change_does():
    rng = np.random.default_rng(0)
    topo = build_topology("ring", "metropolis-hastings", 8, seed=0)
    msgs = _messages(8, rng)
    own = msgs[3]
    base = _mix(topo, 3, msgs, own)

    changed_far = {**msgs, 6: {k: v + 100 for k, v in msgs[6].items()}}
    for k, v in _mix(topo, 3, changed_far, own).items():
        np.testing.assert_array_equal(v, base[k])

    changed_near = {**msgs, 4: {k: v + 1 for k, v in msgs[4].items()}}
    moved = _mix(topo, 3, changed_near, own)
    for k in base:
        # node 3 gives neighbour 4 weight 1/3 in a Metropolis-Hastings ring
        np.testing.assert_allclose(moved[k] - base[k], 1 / 3, rtol=1e-5)


def test_dsgd_mix_is_the_row_of_w_and_missing_weight_stays_home():
    topo = build_topology("star", "metropolis-hastings", 5, seed=0)
    x = {j: {"p": np.full(2, float(j))} for j in range(5)}
    row = topo.row(0)  # hub: 1/5 for itself and each leaf
    full = create_strategy("dsgd").combine(x[0], {}, {j: x[j] for j in range(1, 5)}, row, 0)
    assert np.allclose(full["p"], sum(row[j] * j for j in row))
    partial = create_strategy("dsgd").combine(x[0], {}, {1: x[1]}, row, 0)
    assert np.allclose(partial["p"], row[1] * 1.0 + (1 - row[1]) * 0.0)


def test_gossip_with_dsgd_reaches_the_exact_average():
    topo = build_topology("ring", "metropolis-hastings", 8, seed=0)
    algo = create_strategy("dsgd")
    x = {j: {"p": np.array([float(j)])} for j in range(8)}
    for _ in range(300):
        x = {
            i: algo.combine(x[i], {}, {j: x[j] for j in topo.neighbours[i]}, topo.row(i), i)
            for i in x
        }
    assert all(abs(x[i]["p"][0] - 3.5) < 1e-6 for i in x)


def test_fedavg_reference_is_the_sample_weighted_average_at_every_node():
    algo = create_strategy("fedavg")
    sizes = {0: 10, 1: 30, 2: 60}
    x = {j: {"p": np.full(2, float(j))} for j in sizes}
    msgs = {}
    for j, n in sizes.items():
        state = {}
        algo.combine(x[j], state, {}, {}, j, num_examples=n)
        msgs[j] = algo.message(x[j], state)
    expected = sum(n * j for j, n in sizes.items()) / sum(sizes.values())
    for i, n in sizes.items():
        inbox = {j: m for j, m in msgs.items() if j != i}
        mixed = algo.combine(x[i], {}, inbox, {}, i, num_examples=n)
        np.testing.assert_allclose(mixed["p"], expected)
