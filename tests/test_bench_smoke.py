"""``python -m bench --quick`` still executes (no timing is asserted).

In the suite: measurement 1 (the Flower engine against the plain loop, whose final accuracies
must agree), 3 (throughput) and 5 (memory per node); 2 and 4 run the same two runners
(``bench.cases.plain_run``, ``flower_run``) at other settings and cost two more minutes on 2
cores, so all five run only with ``FLOWER_P2P_SLOW=1``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALL = os.environ.get("FLOWER_P2P_SLOW") == "1"


def _bench(out: Path, only: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--only", *only],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text()


@pytest.mark.parametrize("only", [["1", "2", "3", "4", "5"] if ALL else ["1", "3", "5"]])
def test_bench_quick_prints_its_measurements(tmp_path, only):
    text = _bench(tmp_path / "results.md", only)
    assert text.startswith("Machine: ") and "cores" in text
    rows = [line for line in text.splitlines() if re.match(r"\| [1-5] \|", line)]
    assert sorted({row[2] for row in rows}) == only
    # every row carries a measured figure: a ratio, a percentage, seconds and GiB, or MiB/node
    assert all(re.search(r"\| -?[\d.]+(×| %| s/round| MiB/node)", row) for row in rows), rows
    # the engine and the plain loop train the same models (exactly: the suite's end-to-end tests
    # check that for every strategy); at this size even the thread counts do not change a bit
    assert re.search(r"final mean accuracy (0\.\d{4}) / \1, same: yes", text), text


def test_node_step_prints_cpu_ms_per_node_round():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.node_step", "--nodes", "3", "--rounds", "2",
         "dataset=digits", "num-nodes=4", "depth=1", "img-size=16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 3 and len(out["cpu_ms_per_node_round"]) == 2
    assert all(t > 0 for t in out["cpu_ms_per_node_round"])
