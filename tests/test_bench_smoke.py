"""``python -m bench --quick`` still executes every measurement (no timing is asserted)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_prints_every_measurement(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("Machine: ") and "cores" in text
    rows = [line for line in text.splitlines() if re.match(r"\| [1-4] \|", line)]
    assert sorted({row[2] for row in rows}) == ["1", "2", "3", "4"]
    # every row carries a measured figure: a ratio, a percentage or seconds and GiB
    assert all(re.search(r"\| [\d.]+(×| %| s/round)", row) for row in rows), rows
    # the engine and the plain loop train the same models (exactly: the suite's end-to-end tests
    # check that for every strategy); at this size even the thread counts do not change a bit
    assert re.search(r"final mean accuracy (0\.\d{4}) / \1, same: yes", text), text
