"""The machine a benchmark ran on: CPU model and flags, GPU, runtime versions, threads.

Numbers from ``resunetpp bench`` mean little without this: OpenVINO's bf16 and INT8 speed
depends on AVX512-BF16 / AMX / VNNI, TensorRT's on the GPU, everything on the thread count.
The CPU and GPU probes and the backends' runtimes are :mod:`resunetpp.engines.info`'s (the same
facts ``resunetpp info`` shows); nothing here raises -- a broken runtime is recorded, not fatal.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass

from resunetpp.engines import info

#: Libraries that are no backend's runtime whose version goes into every report, each as
#: ``(library, the library it is listed after)``; with every backend's runtime they make :func:`runtimes`.
LIBRARIES = (("numpy", "torch"), ("onnx", "numpy"), ("onnxslim", "onnxruntime"), ("nncf", "openvino"),
             ("cuda-python", "tensorrt"))
#: CPU flags that give native bf16 arithmetic (x86: AVX512-BF16 or AMX-BF16; Arm: BF16 extension).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16_problem(flags: dict[str, bool]) -> str | None:
    """``None`` when the CPU computes bf16 natively, else why a bf16 row is not worth running."""
    if any(flags.get(f) for f in BF16_FLAGS):
        return None
    return ("this CPU has no native bf16 (none of " + ", ".join(BF16_FLAGS) + "): bf16 would be emulated, "
            "slower than FP32")


def runtimes() -> tuple[str, ...]:
    """Libraries whose version goes into every report: each registered backend's runtime, and
    :data:`LIBRARIES` in their places."""
    return tuple(info.libraries(LIBRARIES))


def _devices(backend: str) -> list[str] | None:
    """What ``backend``'s device probe lists (ONNX Runtime: its providers), ``None`` when absent or broken."""
    found, _problems = info.backends(only=(backend,))
    return found.get(backend)


def thread_settings(requested: int | None) -> dict:
    """The thread count asked for and what torch uses."""
    import torch

    return {"requested": requested, "torch_intra_op": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def collect_environment(threads: int | None = None) -> dict:
    """Everything a reader needs to compare this report with another machine's (JSON-ready)."""
    from resunetpp.engines.openvino_engine import cpu_properties

    try:
        gpu = info.gpu_info()
    except Exception as e:  # noqa: BLE001 - a broken CUDA install is a fact, not an error
        gpu = {"error": f"{type(e).__name__}: {str(e).strip()[:160]}"}
    cpu = info.cpu_info()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": {**cpu, "flags_present": [f for f, on in cpu["flags"].items() if on]},
        "gpu": gpu,
        "versions": {name: info.library_version(name) for name in runtimes()},
        "onnxruntime_providers": _devices("onnxruntime"),
        "openvino_cpu": cpu_properties(),
        "threads": thread_settings(threads),
    }


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: unchanged); restored afterwards."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _busy_cpu_seconds() -> float | None:
    """CPU-seconds all processes have run (``/proc/stat``: user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Contention:
    """CPU time other processes took while a block ran; ``pct``: share of the machine's logical CPUs."""

    pct: float | None = None


@contextlib.contextmanager
def other_processes_cpu() -> Iterator[Contention]:
    """Measure how busy other processes kept the CPU during the block (Linux; ``pct`` stays ``None``
    elsewhere). Timings taken while another job ran are not comparable with an idle machine's:
    on the 2-core benchmark box one busy neighbour halved OpenVINO's rate (benchmarks/PERF.md)."""
    found = Contention()
    busy0, own0 = _busy_cpu_seconds(), _own_cpu_seconds()
    wall0 = time.perf_counter()
    try:
        yield found
    finally:
        busy1 = _busy_cpu_seconds()
        wall = time.perf_counter() - wall0
        if busy0 is not None and busy1 is not None and wall > 0:
            other = max(0.0, (busy1 - busy0) - (_own_cpu_seconds() - own0))
            found.pct = min(100.0, 100.0 * other / (wall * (os.cpu_count() or 1)))
