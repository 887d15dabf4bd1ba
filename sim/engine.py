"""Run one experiment through Flower's simulation engine, in this process.

Flower's public ``run_simulation`` is deprecated and cannot pass a run config, and ``flwr run``
needs a SuperLink process. So this calls the simulation runtime that ``flwr run`` itself uses
(the private ``_run_simulation``, tested with flwr 1.42 only, hence ``flwr>=1.42,<1.43`` in
pyproject.toml), with a throw-away app folder whose ``pyproject.toml`` carries the fully resolved
run config: every ClientApp and the ServerApp see exactly the keys ``flwr run . --run-config ...``
would give them. ``simulation_runtime`` checks its signature before anything else runs.
"""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w
import torch

from flower_p2p.checkpoint import open_out_dir
from flower_p2p.config import ExperimentConfig
from flower_p2p.hosting import supernodes_needed
from flower_p2p.node import CENTRALIZED_NODE
from flower_p2p.results import resolve_out_dir
from flower_p2p.server_app import preflight

SERVER_APP = "flower_p2p.server_app:app"
CLIENT_APP = "flower_p2p.client_app:app"

# The flwr versions whose private simulation runtime this module is tested with.
SUPPORTED_FLWR = "1.42.*"
# The keywords run_experiment passes to flwr's ``_run_simulation``.
SIMULATION_KWARGS = (
    "num_supernodes", "exit_event", "server_app_attr", "client_app_attr", "backend_name",
    "backend_config", "app_dir", "is_app", "verbose_logging", "server_app_context",
)  # fmt: skip


def simulation_runtime() -> tuple[Callable[..., Any], Any]:
    """The private ``_run_simulation`` of flwr and the exit event to pass, if it takes our keywords.

    Otherwise a RuntimeError naming the installed and the supported flwr and what to do, raised
    before the results folder, the data or Ray are touched.
    """
    try:
        module = importlib.import_module("flwr.simulation.run_simulation")
        run, exit_event = module._run_simulation, module.EventType.PYTHON_API_RUN_SIMULATION_LEAVE
    except (ImportError, AttributeError) as err:
        raise RuntimeError(_unsupported(f"flwr.simulation.run_simulation: {err}")) from err
    params = inspect.signature(run).parameters
    missing = [k for k in SIMULATION_KWARGS if k not in params]
    required = [
        name for name, p in params.items()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and name not in SIMULATION_KWARGS
    ]  # fmt: skip
    if missing:
        raise RuntimeError(_unsupported(f"its _run_simulation lacks {', '.join(missing)}"))
    if required:
        raise RuntimeError(_unsupported(f"its _run_simulation requires {', '.join(required)}"))
    return run, exit_event


def _unsupported(what: str) -> str:
    try:
        installed = f"flwr {metadata.version('flwr')} is installed"
    except metadata.PackageNotFoundError:
        installed = "flwr is not installed"
    return (
        f"{installed}, but python -m sim runs Flower's private simulation runtime, tested with "
        f"flwr {SUPPORTED_FLWR} only ({what}). Install the supported version: pip install "
        f"'flwr[simulation]=={SUPPORTED_FLWR}'; or run the app through Flower's public CLI: "
        f"flwr run . --run-config '...' (see the README)"
    )


def num_supernodes(cfg: ExperimentConfig) -> int:
    """SuperNodes needed: one per ``nodes-per-supernode`` graph nodes; the reference uses one."""
    if cfg.strategy == "centralized":
        return CENTRALIZED_NODE + 1
    return supernodes_needed(cfg.num_nodes, cfg.nodes_per_supernode)


# Opt in to Ray's coming behaviour (leave CUDA_VISIBLE_DEVICES alone for CPU-only actors);
# without it every run prints a FutureWarning about this very setting.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def backend_config(cfg: ExperimentConfig) -> dict:
    """One CPU per node (torch threads follow: Ray sets OMP_NUM_THREADS); a GPU share if any.

    With ``RAY_ADDRESS`` set, ``ray.init`` attaches to that running Ray cluster, whose machines
    provide the CPUs: Ray refuses ``num_cpus`` when attaching, so it is left out.
    """
    gpus = 1.0 / min(num_supernodes(cfg), 4) if torch.cuda.is_available() else 0.0
    init_args = {"logging_level": "ERROR", "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        init_args["num_cpus"] = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus}, "init_args": init_args}


def run_app(
    run_config: dict,
    supernodes: int,
    server_app: str = SERVER_APP,
    client_app: str = CLIENT_APP,
    backend: dict | None = None,
    verbose: bool = False,
) -> None:
    """Run a Flower app (``module:attribute`` of its ServerApp and ClientApp) in this process.

    Every ClientApp and the ServerApp see ``run_config`` as ``flwr run --run-config`` would give
    it. The project's experiment uses it through ``run_experiment``; tests run other apps (one
    that adopts ``GossipStrategy`` with its own model) the same way.
    """
    from flwr.app import Context, RecordDict

    from sim.message_pump import install

    run_simulation, exit_event = simulation_runtime()
    install()  # one scan of the message store per sweep, not one per node (large runs)
    with tempfile.TemporaryDirectory(prefix="flower-p2p-app-") as app_dir:
        _write_app(Path(app_dir), run_config, server_app, client_app)
        run_simulation(
            num_supernodes=supernodes,
            exit_event=exit_event,
            server_app_attr=server_app,
            client_app_attr=client_app,
            backend_name="ray",
            backend_config=backend
            or {
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"logging_level": "ERROR"},
            },  # fmt: skip
            app_dir=app_dir,
            is_app=True,
            verbose_logging=verbose,
            server_app_context=Context(
                run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
            ),  # fmt: skip
        )


def _write_app(app_dir: Path, run_config: dict, server_app: str, client_app: str) -> None:
    project = {
        "project": {"name": "flower-p2p-sim", "version": "0.1.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "flower-p2p",
                    "components": {"serverapp": server_app, "clientapp": client_app},
                    "config": run_config,
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))


def run_experiment(
    cfg: ExperimentConfig, verbose: bool = False, server_app: str = SERVER_APP
) -> Path:
    """Validate, then run ``cfg`` in Flower's simulation engine; returns the results folder.

    ``server_app`` is the ServerApp's ``module:attribute`` (tests wrap the relay to watch it).
    """
    simulation_runtime()  # a changed private Flower API: refused before the folder, data, Ray
    out = resolve_out_dir(cfg.out_dir, cfg.strategy)
    cfg = cfg.replace(out_dir=str(out))
    preflight(cfg)  # fail fast, before Ray starts
    # refuse a bad out-dir or resume before Ray starts; the ServerApp deletes old results
    open_out_dir(out, cfg.to_run_config(), cfg.resume, cfg.overwrite, check_only=True)
    run_app(cfg.to_run_config(), num_supernodes(cfg), server_app, CLIENT_APP,
            backend_config(cfg), verbose)  # fmt: skip
    if not (out / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without writing {out / 'summary.json'}")
    return out
