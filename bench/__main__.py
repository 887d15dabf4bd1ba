"""``python -m bench``: the performance ratios of issue 5, measured side by side in one run.

1. the default experiment through Flower's simulation engine vs the same training in a plain
   single-process loop (time ratio; same nodes, steps, mixing, same final accuracy);
2. head-only and last-k fine-tuning without vs with the frozen-prefix cache (time ratio);
3. training throughput of the default model vs the machine's fp32 matmul rate;
4. wall time per round and peak memory of the process tree at 64 to 1,024 head-only nodes,
   at 1,024 with several graph nodes per SuperNode (``nodes-per-supernode``), and at 256 nodes
   with LoRA and last-k (which train through the backbone);
5. the memory one more node costs a process that serves nodes one after another (a ClientApp
   actor), full fine-tuning of a 22 M-parameter ViT-S: nodes share the process's model;
6. the memory estimate runs are admitted on (``flower_p2p.memory``) against the peaks they
   reached: driver, largest actor and the whole process tree.

``--quick`` runs tiny versions (a smoke check that everything still executes, not a measurement);
``--only 1 3`` runs a subset. Results are printed and written as Markdown (``--out``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import cases
from bench.machine import machine_info
from bench.scaling_plot import plot_scaling
from flower_p2p.hosting import supernodes_needed
from flower_p2p.results import atomic_write_text

FULL = {
    "experiment": [],  # the default experiment: pyproject's run config, 90 rounds
    "cache": ["num-rounds=30"],
    "throughput": [],
    # glyphs: 10,080 training images, ~10 a node at 1,024 nodes (digits has 1,437)
    "scaling": ["finetune=head", "dataset=glyphs", "partitioner=iid", "num-rounds=20"],
    "nodes": [64, 128, 256, 512, 1024],
    # the largest node count again with several graph nodes per SuperNode (nodes-per-supernode):
    # one Flower message and Ray task per SuperNode instead of per graph node
    "hosted": [16, 64],
    # the modes that train through the backbone, at 256 nodes (issue 13): fewer rounds, each is
    # a full forward and backward per step
    "scaling-modes": [
        ["finetune=lora", "dataset=glyphs", "partitioner=iid", "num-rounds=6", "num-nodes=256"],
        ["finetune=last-k", "dataset=glyphs", "partitioner=iid", "num-rounds=6", "num-nodes=256"],
    ],
    "seconds": 10.0,
    "node-memory": (["model=vit_small_patch16_224", "depth=0"], 8),
    "memory": [
        ["num-rounds=3"],
        ["num-rounds=3", "strategy=k-gt"],
        ["num-rounds=3", "model=vit_small_patch16_224", "depth=12"],
        ["num-rounds=3", "model=vit_small_patch16_224", "depth=12", "num-nodes=16"],
        ["num-rounds=2", "finetune=head", "dataset=glyphs", "partitioner=iid", "num-nodes=256"],
    ],
}
QUICK = {
    "experiment": ["num-nodes=3", "num-rounds=2", "depth=1", "eval-every=1"],
    "cache": ["num-nodes=3", "num-rounds=3", "depth=2", "eval-every=1"],
    "throughput": ["depth=1"],
    "scaling": ["finetune=head", "num-rounds=2", "depth=1"],
    "nodes": [4],
    "hosted": [2],
    "scaling-modes": [["finetune=lora", "num-rounds=2", "depth=1", "num-nodes=4"]],
    "seconds": 1.0,
    "node-memory": (["depth=1"], 3),
    "memory": [["num-nodes=3", "num-rounds=2", "depth=1"]],
}


def _x(v: float) -> str:
    return f"{v:.2f}×" if v < 10 else f"{v:.0f}×"


def run(settings: dict, only: set[int]) -> tuple[list[str], dict]:
    """Run the selected measurements; Markdown lines of the results and the raw figures."""
    raw: dict = {}
    rows = ["| # | measurement | result | goal | met |", "|---|---|---|---|---|"]
    if 1 in only:
        r = raw[1] = cases.engine_vs_plain(settings["experiment"])
        f, p = r["flower"], r["plain"]
        rows.append(
            f"| 1 | Flower engine / plain loop, rounds 2..R: {f['rounds_s']:.1f} s / "
            f"{p['rounds_s']:.1f} s (whole command: {f['command_s']:.1f} s / "
            f"{p['command_s']:.1f} s = {_x(r['ratio_command'])}; final mean accuracy "
            f"{f['final_mean']:.4f} / {p['final_mean']:.4f}, same: "
            f"{'yes' if r['same_accuracy'] else 'no'}) | {_x(r['ratio_rounds'])} | ≤ 1.10× | "
            f"{'yes' if r['ratio_rounds'] <= 1.10 else 'no'} |"
        )
    if 2 in only:
        for mode in ("head", "last-k"):
            r = raw[f"2-{mode}"] = cases.cache_ratio([*settings["cache"], f"finetune={mode}"])
            goal = "≥ 50×" if mode == "head" else "–"
            met = ("yes" if r["ratio_rounds"] >= 50 else "no") if mode == "head" else "–"
            rows.append(
                f"| 2 | finetune={mode}, no cache / cache, rounds 2..R: "
                f"{r['off']['rounds_s']:.2f} s / {r['on']['rounds_s']:.3f} s (whole command: "
                f"{r['off']['command_s']:.1f} s / {r['on']['command_s']:.1f} s = "
                f"{_x(r['ratio_command'])}; accuracy differs by {r['accuracy_diff']:.4f}) | "
                f"{_x(r['ratio_rounds'])} | {goal} | {met} |"
            )
    if 3 in only:
        r = raw[3] = cases.throughput(settings["throughput"], settings["seconds"])
        rows.append(
            f"| 3 | default model training (batch {r['batch']}, {r['threads']} threads): "
            f"{r['images_s']:.0f} images/s × {r['gflop_per_image']:.4f} GFLOP/image = "
            f"{r['model_gflops']:.1f} GFLOP/s of a {r['matmul_gflops']:.1f} GFLOP/s fp32 "
            f"matmul rate | {100 * r['fraction']:.1f} % | – | – |"
        )
    if 4 in only:
        r = raw[4] = cases.scaling(settings["scaling"], settings["nodes"])
        base = r[0]["round_s"] / r[0]["nodes"]
        for row in r:
            big = row["nodes"] == max(settings["nodes"]) and row["nodes"] >= 1024
            per = row["round_s"] / row["nodes"]
            met = row["round_s"] <= 5 and row["peak_gib"] < 6 and per / base <= 1.2
            rows.append(
                f"| 4 | {row['nodes']} head-only nodes ({' '.join(settings['scaling'])}): wall "
                f"per round (median, rounds 2..R), peak memory (PSS) of the process tree (RSS sum "
                f"{row['peak_rss_gib']:.2f} GiB); {1000 * per:.1f} ms per node-round = "
                f"{per / base:.2f}× the {r[0]['nodes']}-node cost; round 1 (building every node) "
                f"ended {row['first_round_s']:.0f} s after the relay started, whole command "
                f"{row['command_s']:.0f} s | {row['round_s']:.2f} s/round, "
                f"{row['peak_gib']:.2f} GiB | {'≤ 5 s, < 6 GiB, ≤ 1.2×' if big else '–'} | "
                f"{('yes' if met else 'no') if big else '–'} |"
            )
        largest = max(settings["nodes"])
        for per in settings["hosted"]:
            row = cases.scaling_row([*settings["scaling"], f"num-nodes={largest}",
                                     f"nodes-per-supernode={per}"])  # fmt: skip
            raw.setdefault("4-hosted", []).append({**row, "per_supernode": per})
            big = largest >= 1024
            met = row["round_s"] <= 5 and row["peak_gib"] < 6
            rows.append(
                f"| 4 | {largest} head-only nodes, {per} per SuperNode (`nodes-per-supernode="
                f"{per}`: {supernodes_needed(largest, per)} Flower messages a round instead of "
                f"{largest}): "
                f"wall per round (median, rounds 2..R), peak memory (PSS; RSS sum "
                f"{row['peak_rss_gib']:.2f} GiB); {1000 * row['round_s'] / largest:.1f} ms per "
                f"node-round; round 1 ended {row['first_round_s']:.0f} s after the relay "
                f"started, whole command {row['command_s']:.0f} s | {row['round_s']:.2f} s/round, "
                f"{row['peak_gib']:.2f} GiB | {'≤ 5 s, < 6 GiB' if big else '–'} | "
                f"{('yes' if met else 'no') if big else '–'} |"
            )
        for overrides in settings["scaling-modes"]:
            row = cases.scaling_row(overrides)
            raw.setdefault("4-modes", []).append(row)
            rows.append(
                f"| 4 | {row['nodes']} nodes, {' '.join(overrides)}: wall per round (median, "
                f"rounds 2..R), peak memory (PSS) of the process tree (RSS sum "
                f"{row['peak_rss_gib']:.2f} GiB); {1000 * row['round_s'] / row['nodes']:.1f} ms "
                f"per node-round; round 1 ended {row['first_round_s']:.0f} s after the relay "
                f"started, whole command {row['command_s']:.0f} s | {row['round_s']:.2f} s/round, "
                f"{row['peak_gib']:.2f} GiB | – | – |"
            )
    if 5 in only:
        overrides, nodes = settings["node-memory"]
        r = raw[5] = cases.node_memory(overrides, nodes)
        # a node's own copy of its trainable parameters, let alone gradients, would exceed this
        goal = r["trainable_mib"] / 4
        rows.append(
            f"| 5 | memory one more node costs a process ({' '.join(overrides)}, full "
            f"fine-tuning, {r['trainable_mib']:.1f} MiB of trainable parameters; resident "
            f"{r['rss_first_mib']:.0f} MiB after 1 node, {r['rss_last_mib']:.0f} MiB after "
            f"{nodes}) | {r['per_node_mib']:.1f} MiB/node | < {goal:.1f} MiB | "
            f"{'yes' if r['per_node_mib'] < goal else 'no'} |"
        )
    if 6 in only:
        for r in cases.memory_estimate(settings["memory"]):
            raw.setdefault(6, []).append(r)
            if "refused" in r:
                rows.append(f"| 6 | {' '.join(r['overrides'])}: refused before training "
                            f"({r['refused']}) | – | – | – |")  # fmt: skip
                continue
            est = r["estimate"]
            rows.append(
                f"| 6 | memory estimate / measured peak PSS, {' '.join(r['overrides'])}: "
                f"{est['total_gib']:.2f} / {r['measured_gib']:.2f} GiB (driver "
                f"{est['driver_gib']:.2f} / {r['driver_gib']:.2f}, largest actor "
                f"{est['actor_gib']:.2f} / {r['actor_gib']:.2f}; {r['command_s']:.0f} s) | "
                f"{r['ratio']:.2f}× | ≥ 1× | {'yes' if r['ratio'] >= 1 else 'no'} |"
            )
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, print, write Markdown."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check")
    parser.add_argument(
        "--only", type=int, nargs="+", choices=[1, 2, 3, 4, 5, 6], default=[1, 2, 3, 4, 5, 6]
    )
    parser.add_argument("--nodes", type=int, nargs="+", help="node counts of measurement 4")
    parser.add_argument("--hosted", type=int, nargs="*", help="nodes-per-supernode values "
                        "measurement 4 also runs at its largest node count")  # fmt: skip
    parser.add_argument("--no-modes", action="store_true", help="measurement 4 without its "
                        "LoRA and last-k runs (about 33 minutes on 2 cores)")  # fmt: skip
    parser.add_argument("--out", default=None, help="Markdown file (default bench/results.md; "
                        "none with --quick)")  # fmt: skip
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.nodes:
        settings["nodes"] = args.nodes
    if args.hosted is not None:
        settings["hosted"] = args.hosted
    if args.no_modes:
        settings["scaling-modes"] = []
    info = machine_info()
    start = time.perf_counter()
    rows, raw = run(settings, set(args.only))
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, GPU: "
        f"{info['gpu']}; Python {info['python']}, torch {info['torch']}, flwr {info['flwr']}, "
        f"timm {info['timm']}; 1-min load average at start: {info['load_avg_1min']}.",
        f"Settings: {'--quick' if args.quick else 'full'}; bench took "
        f"{time.perf_counter() - start:.0f} s.",
        "",
        *rows,
    ]
    if 4 in raw:
        last = raw[4][-1]
        procs = ", ".join(f"{k}×{v}" for k, v in sorted(last["peak_processes"].items()))
        lines += ["", f"Processes at the peak of {last['nodes']} nodes: {procs}.",
                  f"Cache: {last['prefix_cache']}."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or (None if args.quick else str(Path(__file__).parent / "results.md"))
    if out:
        atomic_write_text(Path(out), text)
        print(f"written to {out}")
        if len(raw.get(4, [])) > 1:  # a scaling curve needs two node counts
            figure = plot_scaling(raw[4], Path(out).with_name(Path(out).stem + "-scaling.png"),
                                  raw.get("4-hosted"))  # fmt: skip
            print(f"written to {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
