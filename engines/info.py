"""What this machine offers the toolkit: library versions, backends, CPU features, GPU.

:func:`collect_info` returns a plain dict (what ``resunetpp info --json`` prints);
:func:`info_tables` renders it for the terminal. Every runtime is imported lazily and a
missing or broken one is reported as ``null`` (with the reason under ``problems``), never
raised: ``info`` is what people run when something is wrong.

The backends, their runtime packages and their device probes come from
:mod:`~resunetpp.engines.registry` (this module lists backends, so it lives in the engines
layer); only the libraries that are no backend's runtime are named here (:data:`TOOLS`).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from resunetpp.defaults import default_data_path, default_model_path
from resunetpp.engines import registry

#: Libraries ``resunetpp info`` reports that are no backend's runtime (ONNX export, NNCF
#: quantization), each as ``(library, the library it is listed after)``.
TOOLS: tuple[tuple[str, str], ...] = (("onnx", "torch"), ("nncf", "openvino"))

#: CPU feature flags that decide which INT8/BF16 kernels a CPU backend can use.
X86_FLAGS = ("sse4_2", "avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
ARM_FLAGS = ("asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2")


def libraries(tools: tuple[tuple[str, str], ...] = TOOLS) -> dict[str, tuple[str, ...]]:
    """``{module: distributions that may provide it}``: each registered backend's runtime (registry
    order; its pip distributions, the first installed one wins), with each of ``tools`` inserted
    after the library it names (at the end when that one is absent)."""
    found = {b.runtime: b.distributions for b in registry.backends()}
    order = list(found)
    for tool, after in tools:
        if tool in found:
            continue
        order.insert(order.index(after) + 1 if after in order else len(order), tool)
        found[tool] = (tool,)
    return {name: found[name] for name in order}


def library_version(module: str) -> str | None:
    """Installed version of ``module`` (see :func:`libraries`), or ``None`` when absent.

    Reads package metadata first (no import); falls back to importing the module, which finds
    e.g. the TensorRT bindings that JetPack installs with apt (no pip metadata).
    """
    for dist in libraries().get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: both mean "not usable"
        return None
    return str(getattr(mod, "__version__", "unknown"))


def parse_cpuinfo(text: str) -> dict:
    """CPU model name and the flags of :data:`X86_FLAGS` / :data:`ARM_FLAGS` from ``/proc/cpuinfo``."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    wanted = ARM_FLAGS if flags & {"asimd", "fp"} and not flags & {"sse2", "avx"} else X86_FLAGS
    return {"model": model, "flags": {f: f in flags for f in wanted}}


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """Model, architecture, logical cores and the relevant feature flags of this CPU."""
    try:
        parsed = parse_cpuinfo(Path(cpuinfo).read_text(encoding="utf-8", errors="replace"))
    except OSError:  # not Linux
        parsed = {"model": None, "flags": {}}
    return {
        "model": parsed["model"] or platform.processor() or None,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "flags": parsed["flags"],
    }


def gpu_info() -> dict | None:
    """The first CUDA device torch sees (name, compute capability, memory), or ``None``."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }


def backends(only: tuple[str, ...] | None = None) -> tuple[dict[str, list[str] | None], dict[str, str]]:
    """Devices each registered backend (or each of ``only``) can run on -- its ``devices`` probe;
    ``None``: not installed -- and why a probe failed."""
    found: dict[str, list[str] | None] = {}
    problems: dict[str, str] = {}
    for backend in registry.backends():
        name = backend.name
        if only is not None and name not in only:
            continue
        try:
            found[name] = backend.devices() if backend.devices is not None else None
        except ImportError:
            found[name] = None
        except Exception as e:  # noqa: BLE001 - a broken runtime is reported, not raised
            found[name] = None
            problems[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    return found, problems


def collect_info() -> dict:
    """Everything ``resunetpp info`` reports, JSON-serialisable."""
    from resunetpp._version import __version__

    found, problems = backends()
    model = default_model_path()
    data = default_data_path()
    try:
        gpu = gpu_info()
    except Exception as e:  # noqa: BLE001
        gpu, problems["gpu"] = None, f"{type(e).__name__}: {e}"
    return {
        "resunetpp": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "versions": {name: library_version(name) for name in libraries()},
        "backends": found,
        "available_backends": [name for name, devices in found.items() if devices],
        "cpu": cpu_info(),
        "gpu": gpu,
        "default_model": str(model) if model else None,
        "default_data": str(data) if data else None,
        "problems": problems,
    }


def info_tables(info: dict) -> list:
    """Rich tables for the terminal: libraries and backends, then the machine."""
    from rich.table import Table

    libs = Table(title=f"resunetpp {info['resunetpp']} (Python {info['python']})", title_justify="left")
    libs.add_column("library")
    libs.add_column("version")
    libs.add_column("devices")
    runs = {b.runtime: b.name for b in registry.backends()}  # library -> the backend it is the runtime of
    for library, version in info["versions"].items():
        name = runs.get(library, library)
        devices = info["backends"].get(name)
        shown = ", ".join(devices) if devices else ("-" if name in info["backends"] else "")
        if name in info["problems"]:
            shown = f"[red]{info['problems'][name]}[/red]"
        label = library if name == library else f"{library} ({name})"
        libs.add_row(label, version or "[dim]not installed[/dim]", shown)

    machine = Table(title="machine", title_justify="left", show_header=False)
    machine.add_column("key", style="bold")
    machine.add_column("value")
    cpu = info["cpu"]
    machine.add_row("platform", info["platform"])
    machine.add_row("cpu", f"{cpu['model'] or 'unknown'} ({cpu['arch']}, {cpu['cores']} logical cores)")
    have = [f for f, on in cpu["flags"].items() if on]
    machine.add_row("cpu features", " ".join(have) or "[dim]none of interest[/dim]")
    gpu = info["gpu"]
    machine.add_row("gpu", f"{gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB, CUDA {gpu['cuda']})"
                    if gpu else "[dim]none visible to torch[/dim]")
    machine.add_row("default model", info["default_model"] or "[dim]none shipped in this install[/dim]")
    machine.add_row("sample data", info["default_data"] or "[dim]none shipped in this install[/dim]")
    return [libs, machine]
