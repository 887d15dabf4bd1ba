"""What the benchmark ran on, and the machine's measured fp32 matmul rate."""

from __future__ import annotations

import os
import platform
import time

import psutil
import torch


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, cores, RAM, GPU, versions, and how busy the machine was when the bench started."""
    import flwr
    import timm

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else _version("flwr"),
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def matmul_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    """Sustained fp32 n x n matmul rate (GFLOP/s) with torch's current threads, on CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
