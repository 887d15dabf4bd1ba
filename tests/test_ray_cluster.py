"""Past one machine: the same simulation on a Ray cluster of several Ray nodes.

A head and a worker Ray node, each with one CPU, start on this machine (``ray.cluster_utils``:
separate raylets with their own resources, as on separate machines); the simulation attaches to
the cluster through ``RAY_ADDRESS``, exactly as ``RAY_ADDRESS=<head> python -m sim run`` does.
Flower sizes its actor pool from the cluster's CPUs, so node work must run on both Ray nodes,
and the results must be byte-identical to the same run on one machine without a cluster.
"""

from __future__ import annotations

import pytest

from flower_p2p.config import ExperimentConfig
from sim.engine import SERVER_APP, backend_config, num_supernodes, run_app


def test_a_run_on_a_two_node_ray_cluster_equals_the_single_machine_run(
    tiny_sim_run, tmp_path, monkeypatch
):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    single, run_config = tiny_sim_run
    record = tmp_path / "ray-nodes.txt"
    record.touch()
    # set before the cluster starts: its processes (and the actors they fork) inherit it
    monkeypatch.setenv("FLOWER_P2P_RAY_NODE_LOG", str(record))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        cfg = ExperimentConfig.from_run_config({**run_config, "out-dir": str(tmp_path / "run")})
        backend = backend_config(cfg)
        assert "num_cpus" not in backend["init_args"]  # the cluster's machines bring the CPUs
        run_app(cfg.to_run_config(), num_supernodes(cfg), SERVER_APP, "ray_cluster_app:app",
                backend)  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    ray_nodes = record.read_text().split()
    # every node trained each round and evaluated at the end
    assert len(ray_nodes) == cfg.num_nodes * (cfg.num_rounds + 1)
    assert len(set(ray_nodes)) == 2, "node work ran on one Ray node only"
    # every accuracy, loss and byte count, round by round (wall times live in network.jsonl)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    assert metrics == (single / "metrics.jsonl").read_bytes()
