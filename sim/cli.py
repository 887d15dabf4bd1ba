"""``python -m sim``: run experiments and compare strategies through Flower's simulation engine.

python -m sim run [key=value ...]       one experiment (same keys as the run config)
python -m sim compare [key=value ...]   gossip vs local vs centralized on the same budget
python -m sim sweep <file.toml>         a grid of run configs x seeds, a mean +- std table
python -m sim pretrain [key=value ...]  pretrain a backbone on a source task -> checkpoint
python -m sim plot <folder>             regenerate every plot of a run, compare or sweep folder
python -m sim table <folder>            table and accuracy-vs-MB plot over finished runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as TOML scalars (bare words are strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError("argument", pair, "key=value (e.g. num-rounds=10)")
        key, raw = pair.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def defaults() -> dict[str, Any]:
    """The run-config defaults: pyproject's [tool.flwr.app.config] when present, else built-in."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.exists():
        cfg = tomllib.loads(pyproject.read_text())
        table = cfg.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
        if table:
            return dict(table)
    return ExperimentConfig().to_run_config()


def config_from_args(pairs: list[str]) -> ExperimentConfig:
    """Defaults overridden by the command line, validated."""
    return ExperimentConfig.from_run_config({**defaults(), **parse_overrides(pairs)})


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "compare"):
        p = sub.add_parser(name)
        p.add_argument("overrides", nargs="*", help="run-config key=value pairs")
        p.add_argument("--verbose", action="store_true")
    p = sub.add_parser("sweep", help="run a grid of configs x seeds (finished runs are skipped)")
    p.add_argument("file", help="sweep TOML: [base] shared keys, [grid] lists of values, seeds")
    p.add_argument("--out", default=None, help="sweep folder (default: next to the TOML file)")
    p.add_argument("--no-plots", action="store_true", help="table only (plot later: sim plot)")
    p.add_argument("--verbose", action="store_true")
    p = sub.add_parser("pretrain", help="train a backbone on a source task, write a checkpoint")
    p.add_argument(
        "overrides",
        nargs="*",
        help="source=rotation|supervised source-dataset=... epochs=N checkpoint=PATH.safetensors, "
        "plus run-config keys (model, img-size, depth, lr, ...)",
    )
    p = sub.add_parser("plot", help="regenerate every plot of a run, compare or sweep folder")
    p.add_argument("folder")
    p = sub.add_parser("table", help="table + accuracy-vs-MB plot over the runs in a folder")
    p.add_argument("folder")
    p.add_argument("--by", default="strategy,finetune", help="run-config keys for the rows")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from sim.engine import run_experiment

            out = run_experiment(config_from_args(args.overrides), verbose=args.verbose)
            print(json.dumps(json.loads((out / "summary.json").read_text()), indent=2))
            print(out)
        elif args.command == "compare":
            from sim.compare import compare

            out = compare(config_from_args(args.overrides), verbose=args.verbose)
            print((out / "compare.md").read_text())
            print(out)
        elif args.command == "sweep":
            from sim.sweep import run_sweep

            out = run_sweep(Path(args.file), args.out and Path(args.out), verbose=args.verbose,
                            plot=not args.no_plots)  # fmt: skip
            print((out / "sweep.md").read_text())
            print(out)
        elif args.command == "pretrain":
            from sim.pretrain import pretrain_from_args, sidecar_path

            path = pretrain_from_args(parse_overrides(args.overrides))
            print(sidecar_path(path).read_text())
            print(path)
        elif args.command == "table":
            from sim.table import plot_accuracy_vs_mb, write_table

            by = tuple(k.strip() for k in args.by.split(","))
            print(write_table(Path(args.folder), by))
            print(plot_accuracy_vs_mb(Path(args.folder), line=by[0], panel=by[-1]))
        else:
            from sim.plots import plot_folder

            for path in plot_folder(Path(args.folder)):
                print(path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
