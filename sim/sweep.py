"""Sweeps: a grid of run-config values x seeds, one Flower run per folder, one mean +- std table.

A sweep file is TOML::

    [base]                     # run-config keys shared by every run
    num-rounds = 30
    [grid]                     # the cartesian product of these lists
    alpha = [0.1, 0.5, 1.0]
    topology = ["ring", "torus"]
    seeds = [0, 1, 2]          # every grid point runs once per seed (default [0])
    reference = true           # also run strategy=centralized once per seed and data setting

Each run goes to ``<sweep>/<key=value,...,seed=s>/`` (references to ``<sweep>/reference/...``).
A run is finished iff its summary.json exists (the relay writes it last, atomically): running
the sweep again skips finished runs and re-does unfinished ones. Every config is validated before
any run starts. sweep.json describes the grid; sweep.md / sweep.csv hold the table.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError
from flower_p2p.results import write_json
from sim.runs import (
    LOCATION_KEYS,
    NOT_REFERENCE_KEYS,
    load_run,
    network_bytes_per_node,
    run_name,
)
from sim.table import write_md_and_csv

SPECIAL = ("seeds", "reference")
REFERENCE_DIR = "reference"

Runner = Callable[[ExperimentConfig], Path]


@dataclass(frozen=True)
class Point:
    """One run of the sweep: grid values, seed, folder (relative to the sweep) and config."""

    values: dict[str, Any]
    seed: int
    name: str
    config: ExperimentConfig
    reference: bool = False

    @property
    def group(self) -> str:
        """The folder name without the seed: one table row."""
        return run_name(self.values)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file."""

    base: dict[str, Any]
    grid: dict[str, list]
    seeds: list[int]
    reference: bool


def read_sweep_file(path: Path) -> SweepSpec:
    """Parse and check the shape of a sweep file (values are checked per run config later)."""
    if not path.is_file():
        raise ConfigError("sweep file", str(path), "an existing TOML file")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("sweep file", str(path), f"valid TOML ({err})") from err
    for key in doc:
        if key not in ("base", "grid"):
            raise ConfigError(key, doc[key], "a [base] or [grid] table at the top level")
    base, grid = dict(doc.get("base", {})), dict(doc.get("grid", {}))
    known = ExperimentConfig.keys()
    for table, keys in (("base", base), ("grid", grid)):
        for key in keys:
            if key in (*LOCATION_KEYS, "seed"):
                allowed = "left to the sweep (seeds: the `seeds` list in [grid]; folder: --out)"
                raise ConfigError(f"{table}.{key}", keys[key], allowed)
            if key not in known and not (table == "grid" and key in SPECIAL):
                raise ConfigError(
                    f"{table}.{key}", keys[key], f"a run-config key ({', '.join(known)})"
                )
    seeds = grid.pop("seeds", [0])
    reference = grid.pop("reference", False)
    if not isinstance(reference, bool):
        raise ConfigError("grid.reference", reference, "true or false")
    if not (isinstance(seeds, list) and seeds and all(_is_int(s) and s >= 0 for s in seeds)):
        raise ConfigError("grid.seeds", seeds, "a non-empty list of integers >= 0")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", values, "a non-empty list of values")
    return SweepSpec(base, grid, seeds, reference)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def expand(spec: SweepSpec, out: Path, defaults: dict[str, Any]) -> list[Point]:
    """Every run of the sweep, references first, each config validated (ConfigError if bad)."""
    points = []
    for combo in itertools.product(*spec.grid.values()):
        values = dict(zip(spec.grid, combo, strict=True))
        for seed in spec.seeds:
            name = run_name({**values, "seed": seed})
            points.append(
                Point(values, seed, name, _config(spec, defaults, values, seed, out, name))
            )
    refs: dict[str, Point] = {}
    if spec.reference:
        for p in points:
            values = {k: v for k, v in p.values.items() if k not in NOT_REFERENCE_KEYS}
            name = f"{REFERENCE_DIR}/{run_name({**values, 'seed': p.seed})}"
            if name not in refs:
                centralized = {**values, "strategy": "centralized", "mode": "sync"}
                cfg = _config(spec, defaults, centralized, p.seed, out, name)
                refs[name] = Point(values, p.seed, name, cfg, reference=True)
    everything = [*refs.values(), *points]
    names = [p.name for p in everything]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError("grid", clash[0], "values whose folder names differ (after replacing "
                          "characters other than letters, digits and ._=,+- by _)")  # fmt: skip
    return everything


def _config(
    spec: SweepSpec,
    defaults: dict[str, Any],
    values: dict[str, Any],
    seed: int,
    out: Path,
    name: str,
) -> ExperimentConfig:
    """The validated config of run ``name``; a bad value names the run."""
    raw = {**defaults, **spec.base, **values, "seed": seed}
    cfg = in_run(name, lambda: ExperimentConfig.from_run_config(raw))
    return cfg.replace(out_dir=str(out / name), overwrite=True)


def in_run(name: str, check: Callable[[], Any]) -> Any:
    """``check()``, its ConfigError also naming the sweep run it is about."""
    try:
        return check()
    except ConfigError as err:
        raise ConfigError(err.key, err.value, f"{err.allowed} (in sweep run {name})") from err


def is_finished(run_dir: Path) -> bool:
    """A run is finished iff the relay wrote its summary.json (last, atomically)."""
    return (run_dir / "summary.json").is_file()


def check_finished_matches(point: Point, out: Path) -> None:
    """A finished run kept from an earlier sweep must have been run with the same config."""
    saved = load_run(out / point.name).config  # keys added since: at their defaults
    want = point.config.to_run_config()
    keys = sorted((set(saved) | set(want)) - set(LOCATION_KEYS))
    diff = [k for k in keys if saved.get(k) != want.get(k)]
    if diff:
        raise ConfigError(
            "sweep folder", str(out),
            f"a folder whose finished run {point.name} has this sweep's config (it differs in "
            f"{', '.join(diff)}); use another --out or change the sweep back",
        )  # fmt: skip


def run_sweep(
    path: Path,
    out: Path | None = None,
    runner: Runner | None = None,
    verbose: bool = False,
    plot: bool = True,
) -> Path:
    """Run every unfinished run of the sweep file ``path``; write the table and the plots.

    ``plot=False`` leaves the sweep-level plots to a later ``sim plot``. ``runner`` runs one
    config and returns its folder (default: Flower's simulation engine, whose runs draw their
    own plots as they finish).
    """
    from flower_p2p.server_app import preflight
    from sim.cli import defaults
    from sim.plots import plot_collection

    spec = read_sweep_file(path)
    out = (out or path.parent / path.stem).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not (out / "sweep.json").exists():
        raise ConfigError("sweep folder", str(out), "a new or empty folder, or an earlier sweep's")
    points = expand(spec, out, defaults())
    todo = set()
    for p in points:
        if is_finished(out / p.name):
            check_finished_matches(p, out)
        else:
            # data and model checks too (partitions, checkpoint shapes), before any run starts
            in_run(p.name, lambda p=p: preflight(p.config))
            todo.add(p.name)
    write_json(out / "sweep.json", describe(spec, points, path))
    if runner is None:
        from sim.engine import run_experiment

        def runner(cfg: ExperimentConfig) -> Path:
            return run_experiment(cfg, verbose=verbose)

    for i, p in enumerate(points, start=1):
        if p.name not in todo:
            print(f"[{i}/{len(points)}] {p.name}: finished, skipped", flush=True)
            continue
        print(f"[{i}/{len(points)}] {p.name}: running", flush=True)
        runner(p.config)
    write_sweep_table(out)
    if plot:  # each run drew its own plots when it finished (references ran first)
        plot_collection(out, per_run=False)
    return out


def describe(spec: SweepSpec, points: list[Point], path: Path) -> dict:
    """sweep.json: the file it came from, the grid, and every run's folder, values and seed."""
    return {
        "file": str(path.resolve()),
        "base": spec.base,
        "grid": spec.grid,
        "seeds": spec.seeds,
        "reference": spec.reference,
        "runs": [
            {"dir": p.name, "values": p.values, "seed": p.seed, "reference": p.reference}
            for p in points
        ],
    }


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean +- std`` over seeds (sample std, ddof=1); the mean alone for one value; "-" none."""
    if not values:
        return "-"
    v = scale * np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def write_sweep_table(out: Path) -> str:
    """sweep.md / sweep.csv: one row per grid point, mean +- std over its finished seeds."""
    sweep = json.loads((out / "sweep.json").read_text())
    keys = list(sweep["grid"])
    rows: dict[str, list[dict]] = {}
    refs: dict[str, list[dict]] = {}
    summaries = {}
    for r in sweep["runs"]:
        summary = out / r["dir"] / "summary.json"
        summaries[r["dir"]] = json.loads(summary.read_text()) if summary.is_file() else None
        (refs if r["reference"] else rows).setdefault(run_name(r["values"]), []).append(r)
    finished = [s for s in summaries.values() if s]
    unseen = any(s.get("unseen_accuracy_mean") is not None for s in finished)
    domain = any(s.get("domain_accuracy_mean") is not None for s in finished)
    hetero = any((s.get("heterogeneity") or {}).get("edge_tv") is not None for s in finished)
    header = [*keys, "seeds", "mean acc (%)", "worst node (%)"]
    header += ["unseen acc (%)"] if unseen else []
    header += ["own-domain acc (%)"] if domain else []
    header += ["centralized (%)"] if refs else []
    header += ["edge TV", "edge / all-pairs TV"] if hetero else []
    header += ["MB on the network per node"]
    table = []
    for group in rows.values():
        done = [summaries[r["dir"]] for r in group if summaries[r["dir"]]]
        row = [str(group[0]["values"][k]) for k in keys]
        row += [f"{len(done)}/{len(group)}", mean_std([s["accuracy_mean"] for s in done]),
                mean_std([s["accuracy_min"] for s in done])]  # fmt: skip
        if unseen:
            row.append(mean_std([s["unseen_accuracy_mean"] for s in done
                                 if s.get("unseen_accuracy_mean") is not None]))  # fmt: skip
        if domain:
            row.append(mean_std([s["domain_accuracy_mean"] for s in done
                                 if s.get("domain_accuracy_mean") is not None]))  # fmt: skip
        if refs:
            ref_values = {
                k: v for k, v in group[0]["values"].items() if k not in NOT_REFERENCE_KEYS
            }
            seeds = {r["seed"] for r in group}
            ref_runs = refs.get(run_name(ref_values), [])
            row.append(mean_std([summaries[r["dir"]]["accuracy_mean"] for r in ref_runs
                                 if r["seed"] in seeds and summaries[r["dir"]]]))  # fmt: skip
        if hetero:
            het = [s.get("heterogeneity") or {} for s in done]
            row.append(mean_std([h["edge_tv"] for h in het if h.get("edge_tv") is not None], 1))
            row.append(mean_std([h["edge_to_all_pairs"] for h in het
                                 if h.get("edge_to_all_pairs") is not None], 1))  # fmt: skip
        row.append(mean_std([network_bytes_per_node(s) for s in done], 1e-6, 1))
        table.append(row)
    return write_md_and_csv(out, "sweep", header, table)
