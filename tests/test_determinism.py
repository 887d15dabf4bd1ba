"""Same config and seed, same numbers: metrics.jsonl is byte-identical across runs."""

from flower_p2p.config import ExperimentConfig
from sim.engine import run_experiment


def test_same_config_and_seed_give_byte_identical_metrics(tiny_sim_run, tmp_path):
    first, run_config = tiny_sim_run
    again = run_experiment(
        ExperimentConfig.from_run_config({**run_config, "out-dir": str(tmp_path)})
    )
    assert again != first
    assert (again / "metrics.jsonl").read_bytes() == (first / "metrics.jsonl").read_bytes()
