"""PyTorch engine: a checkpoint run eagerly on CPU or CUDA, the reference every backend matches.

Options: ``channels_last`` (bool, NHWC memory format: faster convolutions on recent CPUs and
tensor-core GPUs; default on for the CPU, where oneDNN's NHWC kernels run the shipped model
about 1.3x faster in FP32 than NCHW -- benchmarks/PERF.md) and ``dtype`` (``fp32`` default,
``bf16`` or ``fp16``: autocast mixed precision; fp16 autocast needs CUDA). Runs under
``torch.inference_mode``.

This module is ``resunetpp.engines.torch_engine``; it imports the real ``torch`` package inside functions only
(absolute imports), so it never shadows it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from resunetpp.engines.base import BackendUnavailableError, Engine, EngineError
from resunetpp.engines.registry import BenchPrecision, BenchSpec, register_backend

#: Accepted spellings of ``dtype`` -> the precision name reported.
DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
          "float16": "fp16", "half": "fp16"}


def _torch():
    return importlib.import_module("torch")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; refuses an absent CUDA device."""
    torch = _torch()
    device = (device or "cpu").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"engine: torch | device {device} | no CUDA device is available to torch")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BackendUnavailableError(f"engine: torch | device {device} | torch sees "
                                          f"{torch.cuda.device_count()} CUDA device(s)")
        return device
    raise EngineError(f"engine: torch | device {device!r} | expected auto, cpu, cuda or cuda:N")


def devices() -> list[str]:
    """``cpu``, and ``cuda`` when torch sees a GPU."""
    torch = _torch()
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bench_device(requested: str) -> str:
    """``bench --device``: ``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; others as given."""
    if requested == "auto":
        return "cuda" if _torch().cuda.is_available() else "cpu"
    return requested


def _arithmetic(precision: str, device: str | None, details: dict) -> str | None:
    """On the CPU, fp32 runs f32 convolutions and bf16 autocast bf16 ones."""
    return {"fp32": "f32", "bf16": "bf16"}.get(precision) if device == "cpu" else None


_BENCH = BenchSpec(
    precisions=(
        BenchPrecision("fp32"),
        BenchPrecision("bf16", options={"dtype": "bf16", "channels_last": True}, cpu_bf16=True),
        BenchPrecision("fp16", options={"dtype": "fp16", "channels_last": True},
                       cpu_problem="fp16 autocast needs a CUDA device (bf16 is the CPU's reduced precision)"),
    ),
    device=bench_device, arithmetic=_arithmetic, color="tab:red")


@register_backend(suffixes=(".safetensors", ".pt", ".pth"), default_for=(".safetensors", ".pt", ".pth"),
                  runtime="torch", install_hint="pip install torch", devices=devices, opens_checkpoints=True,
                  order=0, bench=_BENCH)
class TorchEngine(Engine):
    """A :class:`~resunetpp.checkpoint.Checkpoint` wrapped in :class:`~resunetpp.model.WithActivation`."""

    backend = "torch"
    option_names = ("channels_last", "dtype")

    def __init__(self, path: str | Path, record: dict, *, device: str = "cpu", checkpoint: Any = None,
                 **options: Any) -> None:
        super().__init__(path, record, device=resolve_device(device), **options)
        dtype = str(options.get("dtype") or "fp32").lower()
        if dtype not in DTYPES:
            raise EngineError(f"engine: torch | dtype {dtype!r} | expected fp32, bf16 or fp16")
        self._dtype = DTYPES[dtype]
        if self._dtype == "fp16" and self.device == "cpu":
            raise EngineError("engine: torch | dtype fp16 on cpu | fp16 autocast needs --device cuda; "
                              "use bf16 on CPU")
        channels_last = options.get("channels_last")
        self._channels_last = self.device == "cpu" if channels_last is None else bool(channels_last)
        self._checkpoint = checkpoint
        self._model = None

    @classmethod
    def from_path(cls, path: str | Path, *, device: str = "cpu", **options: Any) -> "TorchEngine":
        from resunetpp.checkpoint import load_checkpoint

        return cls.from_checkpoint(load_checkpoint(path), device=device, **options)

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, *, device: str = "cpu", **options: Any) -> "TorchEngine":
        """An engine on an in-memory checkpoint (its ``path`` may be ``None``)."""
        record = checkpoint.metadata()
        record["artifact"] = {"format": "checkpoint", "precision": "fp32",
                              "file": Path(checkpoint.path).name if checkpoint.path else None,
                              "source_sha256": checkpoint.sha256,
                              "input_shape": ["batch", checkpoint.config.in_channels, "height", "width"]}
        return cls(checkpoint.path or Path("<memory>"), record, device=device, checkpoint=checkpoint, **options)

    @property
    def precision(self) -> str:
        return self._dtype

    @property
    def channels_last(self) -> bool:
        """Whether the model and each batch run in NHWC (``channels_last``) memory format."""
        return self._channels_last

    def _details(self) -> dict:
        return {"channels_last": self._channels_last, "torch": _torch().__version__}

    def _load_impl(self) -> None:
        torch = _torch()
        from resunetpp.model import WithActivation

        if self._checkpoint is None:
            from resunetpp.checkpoint import load_checkpoint

            self._checkpoint = load_checkpoint(self.path)
        model = WithActivation(self._checkpoint.build_model(self.device)).eval()
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._model = model

    def _forward(self, batch: np.ndarray):
        """The module's forward on ``batch`` as a torch user would call it: moved to the device,
        channels-last if set, autocast for bf16/fp16, under ``inference_mode``; a torch tensor."""
        torch = _torch()
        x = torch.from_numpy(batch)  # shares memory with the batch: no copy on CPU
        if self.device != "cpu":
            x = x.to(self.device, non_blocking=False)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self._dtype)
        with torch.inference_mode(), torch.autocast(device_type=device_type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            return self._model(x)

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        with _torch().inference_mode():
            out = self._forward(batch).float().contiguous()
        return out.cpu().numpy() if self.device != "cpu" else out.numpy()

    def _runtime_call_impl(self):
        torch = _torch()
        cuda = self.device.startswith("cuda")

        def call(x: np.ndarray) -> Any:  # the forward alone, synchronized so its time is measured
            out = self._forward(x)
            if cuda:
                torch.cuda.synchronize()
            return out

        return call

    def _close_impl(self) -> None:
        self._model = None
        torch = _torch()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
