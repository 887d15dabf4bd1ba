"""`flwr run .` the Flower way: a local SuperLink, the app's pyproject config, run-config overrides.

The SuperLink gets its own FLWR_HOME and ports, so a user's running SuperLink is neither used nor
disturbed, and the test stops every process it started.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def flwr_env(tmp_path):
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        # flwr starts `flower-superlink` from PATH: use this interpreter's
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    yield env
    # `flwr run` detaches the SuperLink into its own session: find it by our FLWR_HOME and stop
    # it together with everything it spawned.
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            if (proc.info["environ"] or {}).get("FLWR_HOME") == env["FLWR_HOME"]:
                for child in proc.children(recursive=True):
                    child.send_signal(signal.SIGKILL)
                proc.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def test_flwr_run_dot_runs_the_app_with_overrides(flwr_env, tmp_path):
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    out = tmp_path / "results"
    overrides = f"num-nodes=3 num-rounds=2 depth=1 eval-every=1 out-dir='{out}'"
    proc = subprocess.run(
        [
            flwr,
            "run",
            ".",
            "--run-config",
            overrides,
            "--federation-config",
            "num-supernodes=3",
            "--stream",
        ],  # fmt: skip
        cwd=ROOT,
        env=flwr_env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_nodes"] == 3 and summary["num_rounds"] == 2
    assert (out / "convergence.png").stat().st_size > 0
    assert "round 2/2" in log  # the relay's progress log is streamed back
    # the run config seen by the app: pyproject defaults fused with the overrides
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["num-nodes"] == 3 and config["topology"] == "ring" and config["depth"] == 1
