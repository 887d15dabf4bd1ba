"""The six measurements. Each returns a dict of figures; commands run as subprocesses.

Every experiment runs as its own command (``python -m sim run`` or ``python -m bench.plain``), so
wall times include what a user waits for and peak memory covers exactly one run's process tree.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.memory import PeakTreeRSS
from flower_p2p.results import read_jsonl

ROOT = Path(__file__).resolve().parent.parent


def run_command(args: list[str]) -> tuple[float, str, PeakTreeRSS]:
    """Run ``python <args>`` from the repository root; wall seconds, stdout, memory sampler."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    with PeakTreeRSS(proc.pid) as mem:
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"python {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, out, mem


def flower_run(overrides: list[str]) -> dict:
    """One ``python -m sim run`` (Flower simulation engine, Ray): times, accuracy, peak memory."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        wall, _, mem = run_command(["-m", "sim", "run", *overrides, f"out-dir={tmp}/run"])
        walls = [n["wall_s"] for n in read_jsonl(Path(tmp) / "run" / "network.jsonl")]
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    return {
        "command_s": wall,
        # rounds 2..R: round 1 also builds every node's model and data in the Ray actors
        "rounds_s": walls[-1] - walls[0],
        "first_round_s": walls[0],  # the relay's start to round 1's end: building every node
        "round_s": [b - a for a, b in zip(walls, walls[1:], strict=False)],
        "final_mean": summary["accuracy_mean"],
        "nodes": summary["num_nodes"],
        "prefix_cache": summary.get("prefix_cache", ""),
        "peak_gib": mem.peak_bytes / 2**30,
        "peak_rss_gib": mem.peak_rss_bytes / 2**30,
        "peak_processes": dict(mem.peak_processes),
    }


def plain_run(overrides: list[str]) -> dict:
    """One ``python -m bench.plain`` (the same training in one process, no Flower, no Ray)."""
    wall, out, mem = run_command(["-m", "bench.plain", *overrides])
    res = json.loads(out.strip().splitlines()[-1])
    return {
        "command_s": wall,
        "rounds_s": sum(res["round_s"][1:-1]),  # rounds 2..R, as for the Flower run
        "final_mean": res["final_mean"],
        "threads": res["threads"],
        "peak_gib": mem.peak_bytes / 2**30,
    }


def engine_vs_plain(overrides: list[str]) -> dict:
    """Measurement 1: the experiment through Flower's engine vs the plain loop, same training."""
    flower = flower_run(overrides)
    plain = plain_run(overrides)
    return {
        "flower": flower,
        "plain": plain,
        "ratio_command": flower["command_s"] / plain["command_s"],
        "ratio_rounds": flower["rounds_s"] / plain["rounds_s"],
        "same_accuracy": abs(flower["final_mean"] - plain["final_mean"]) < 1e-6,
    }


def cache_ratio(overrides: list[str]) -> dict:
    """Measurement 2: the plain loop without and with the frozen-prefix cache."""
    off = plain_run([*overrides, "prefix-cache=off"])
    on = plain_run([*overrides, "prefix-cache=on"])
    return {
        "off": off,
        "on": on,
        "ratio_rounds": off["rounds_s"] / on["rounds_s"],
        "ratio_command": off["command_s"] / on["command_s"],
        "accuracy_diff": abs(off["final_mean"] - on["final_mean"]),
    }


def throughput(overrides: list[str], seconds: float = 10.0) -> dict:
    """Measurement 3: training images/s of the model vs what the matmul rate would allow."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.machine import matmul_gflops
    from flower_p2p.models import apply_finetune, create_model
    from flower_p2p.training import make_optimizer, train_epochs
    from sim.cli import config_from_args

    cfg = config_from_args(overrides)
    side = cfg.img_size or 224
    model, _ = apply_finetune(create_model(cfg, 10), cfg)
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    x, y = torch.randn(512, 3, side, side), torch.randint(0, 10, (512,))
    batch = cfg.batch_size
    counter = FlopCounterMode(display=False)
    with counter:  # one forward + backward of one batch
        torch.nn.functional.cross_entropy(model(x[:batch]), y[:batch]).backward()
    flops_per_image = counter.get_total_flops() / batch
    gen = torch.Generator().manual_seed(0)
    train_epochs(model, x, y, opt, 1, batch, gen, torch.device("cpu"), steps=3)  # warm-up
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        train_epochs(model, x, y, opt, 1, batch, gen, torch.device("cpu"), steps=4)
        steps += 4
    images_s = steps * batch / (time.perf_counter() - start)
    gflops = matmul_gflops()
    return {
        "images_s": images_s,
        "gflop_per_image": flops_per_image / 1e9,
        "matmul_gflops": gflops,
        "model_gflops": images_s * flops_per_image / 1e9,
        "fraction": images_s * flops_per_image / 1e9 / gflops,
        "threads": torch.get_num_threads(),
        "batch": batch,
    }


def scaling(overrides: list[str], nodes: list[int]) -> list[dict]:
    """Measurement 4: wall time per round and peak memory of the whole run at each node count."""
    return [scaling_row([*overrides, f"num-nodes={n}"]) for n in nodes]


def scaling_row(overrides: list[str]) -> dict:
    """One run of measurement 4: its node count, median round, peaks."""
    run = flower_run(overrides)
    rounds = run["round_s"]
    return {
        "nodes": run["nodes"],
        "round_s": statistics.median(rounds) if rounds else float("nan"),
        "command_s": run["command_s"],
        "first_round_s": run["first_round_s"],
        "peak_gib": run["peak_gib"],
        "peak_rss_gib": run["peak_rss_gib"],
        "peak_processes": run["peak_processes"],
        "prefix_cache": run["prefix_cache"],
    }  # fmt: skip


def node_memory(overrides: list[str], nodes: int) -> dict:
    """Measurement 5: resident memory one more node costs a process that serves nodes in turn."""
    _, out, _ = run_command(["-m", "bench.node_memory", *overrides, f"nodes={nodes}"])
    return json.loads(out.strip().splitlines()[-1])


def memory_estimate(runs: list[list[str]]) -> list[dict]:
    """Measurement 6: the memory estimate a run is admitted on vs the peaks it reached.

    A run the estimate refuses on this machine now is recorded as refused, not measured.
    """
    rows = []
    for overrides in runs:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            try:
                wall, _, mem = run_command(["-m", "sim", "run", *overrides, f"out-dir={tmp}/run"])
            except RuntimeError as err:
                if "a run that fits in memory" not in str(err):
                    raise
                rows.append({"overrides": overrides, "refused": str(err).rsplit("error: ", 1)[-1]})
                continue
            summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        est = summary["memory_estimate"]
        rows.append({
            "overrides": overrides,
            "command_s": wall,
            "estimate": est,
            "measured_gib": mem.peak_bytes / 2**30,
            "driver_gib": mem.root_peak() / 2**30,
            "actor_gib": mem.largest_peak("ray::ClientApp") / 2**30,
            "ratio": est["total_gib"] / (mem.peak_bytes / 2**30),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)  # a long measurement: each run as it ends
    return rows
