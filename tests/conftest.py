import os

import pytest

# The hub is unreachable here and in CI; without this every hub lookup stalls ~48 s first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# One tiny experiment through the simulation engine, which the Deployment Engine test runs again
# on real SuperNodes and must reproduce byte for byte: kebab-case keys.
TINY_RUN = {"num-nodes": 3, "num-rounds": 2, "depth": 1, "img-size": 16, "eval-every": 1}


@pytest.fixture(scope="session")
def tiny_sim_run(tmp_path_factory):
    """(results folder, run config) of TINY_RUN in Flower's simulation engine."""
    from flower_p2p.config import ExperimentConfig
    from sim.engine import run_experiment

    out = tmp_path_factory.mktemp("tiny-sim")
    cfg = ExperimentConfig.from_run_config({**TINY_RUN, "out-dir": str(out)})
    return run_experiment(cfg), dict(TINY_RUN)


@pytest.fixture(scope="session")
def small_runs(tmp_path_factory):
    """``small_runs(name)``: the results folder of a small_runs.CASES run, run once a session."""
    from small_runs import SmallRuns

    return SmallRuns(tmp_path_factory.mktemp("small-runs"))


@pytest.fixture
def task_identity():
    """Flower messages need the identity a running task has; restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
