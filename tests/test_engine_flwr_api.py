"""sim/engine.py calls flwr's private ``_run_simulation``: an incompatible flwr is refused first."""

import importlib

import pytest

from flower_p2p.config import ExperimentConfig
from sim.engine import run_experiment, simulation_runtime

# the module: `flwr.simulation.run_simulation` as an attribute is the public function
flwr_sim = importlib.import_module("flwr.simulation.run_simulation")


def _refused(tmp_path) -> str:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError) as err:
        run_experiment(ExperimentConfig(out_dir=str(out), num_rounds=1, depth=1))
    assert not out.exists()  # refused before the folder, the data or Ray
    return str(err.value)


def test_another_signature_is_refused_before_ray_starts(tmp_path, monkeypatch):
    def other(num_supernodes, exit_event, app_path=""):  # a future flwr's runtime
        raise AssertionError("must not be called")

    monkeypatch.setattr(flwr_sim, "_run_simulation", other)
    msg = _refused(tmp_path)
    assert "flwr 1." in msg and "installed" in msg and "1.42" in msg
    assert "server_app_attr" in msg  # what is missing
    assert "flwr[simulation]==1.42.*" in msg and "flwr run" in msg  # what to do


def test_a_missing_runtime_is_refused_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.delattr(flwr_sim, "_run_simulation")
    msg = _refused(tmp_path)
    assert "_run_simulation" in msg and "flwr[simulation]==1.42.*" in msg


def test_the_installed_flwr_is_accepted():
    run, exit_event = simulation_runtime()
    assert run is flwr_sim._run_simulation and exit_event.name == "PYTHON_API_RUN_SIMULATION_LEAVE"
