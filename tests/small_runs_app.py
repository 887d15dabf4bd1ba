"""A ServerApp that runs every small run of ``small_runs.CASES`` in one Flower simulation.

Each case is the project's own experiment (``server_app.run_experiment``: preflight, the results
folder, ``GossipStrategy``), run one after another on the same SuperNodes; the relay configures
the nodes for each one (``query.configure``), so every case starts from a clean node state.
Ray starts once instead of once per case. The relay runs behind ``relay_capture_app``'s
recording Grid, so each case's folder also holds ``relay_log.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from relay_capture_app import RecordingGrid
from small_runs import case_config

from flower_p2p.server_app import run_experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Every case named in the run config's ``cases``, into ``<root>/<case>``."""
    root = Path(str(context.run_config["root"]))
    for name in str(context.run_config["cases"]).split(","):
        watched = RecordingGrid(grid)
        out = run_experiment(watched, case_config(name, str(root / name)))  # type: ignore[arg-type]
        log = {"sent": watched.sent, "replies": watched.replies, "hosted": watched.hosted}
        (out / "relay_log.json").write_text(json.dumps(log))
