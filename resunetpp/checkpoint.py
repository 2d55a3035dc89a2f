"""Checkpoints: one file holding the weights and everything needed to use them.

Format (``.safetensors``, the default): the tensors, plus a JSON record in the safetensors
header under ``resunetpp`` with the model config, class names, preprocessing and training
provenance. safetensors holds no code, so an untrusted file cannot run anything when loaded.

Also read: ``.pt``/``.pth`` files through ``torch.load(weights_only=True)`` (which refuses
pickled objects other than tensors and plain containers) holding either
``{"state_dict": ..., "config": {...}}`` or a bare state dict -- this toolkit's naming or the
authors' official PyTorch port's (``c1..c4``, ``b1``, ``d1..d3``, ``aspp``, ``output``), mapped
by :func:`resunetpp.model.map_official_state_dict`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resunetpp.artifact import record_error, record_problem
from resunetpp.atomic import atomic_path
from resunetpp.errors import CheckpointError, RecordFieldError
from resunetpp.model import ModelConfig, ResUNetPlusPlus, is_official_state_dict, map_official_state_dict
from resunetpp.preprocess import Preprocessing

FORMAT_VERSION = 1
METADATA_KEY = "resunetpp"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lineage(path: str | Path, checkpoint: "Checkpoint") -> dict:
    """Where a model derived from ``checkpoint`` (read from ``path``) came from: kept in the new
    checkpoint's ``provenance["lineage"]`` so that the chain stays readable after ``path`` changes."""
    return {"init_from": str(path), "init_sha256": file_sha256(path), "init_provenance": checkpoint.provenance}


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    class_names: list[str] = field(default_factory=lambda: ["polyp"])
    provenance: dict = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.config.to_dict(),
            "activation": self.config.activation,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "provenance": self.provenance,
        }

    def build_model(self, device: str | torch.device = "cpu") -> ResUNetPlusPlus:
        try:
            model = ResUNetPlusPlus(self.config)
        except ValueError as e:  # a config whose blocks cannot be built (checked fields, impossible together)
            raise CheckpointError(self.path or "<memory>", f"invalid config record ({e})") from None
        load_state_dict_checked(model, self.state_dict, self.path or "<memory>")
        return model.to(device).eval()


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, path: str | Path) -> None:
    """``load_state_dict`` with one-line errors naming missing/extra keys and wrong shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), e.g. {extra[0]!r}")
        raise CheckpointError(path, "weights do not fit this ResUNet++ config: " + "; ".join(parts))
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(path, f"weight {k!r} has shape {tuple(v.shape)}, the model expects "
                                        f"{tuple(own[k].shape)} (another architecture or width?)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()})


def save_checkpoint(ckpt: Checkpoint, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``ckpt`` atomically as safetensors; ``dtype=torch.float16`` halves the file.

    The bytes are made in memory and written through :func:`~resunetpp.atomic.atomic_path` (not by
    safetensors' own file writer, whose ``.tmpXXXXXX`` a killed process would leave behind), so a
    full disk is one :class:`~resunetpp.errors.OutputWriteError` naming ``path``.
    """
    from safetensors.torch import save

    path = Path(path)
    tensors = {}
    for k, v in ckpt.state_dict.items():
        v = v.detach().cpu().contiguous()
        if dtype is not None and v.is_floating_point() and "running_var" not in k:
            v = v.to(dtype)
        tensors[k] = v
    meta = ckpt.metadata()
    meta["stored_dtype"] = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    data = save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def _from_metadata(meta: dict, state: dict, path: Path) -> Checkpoint:
    """The checkpoint of a record, every field checked (:func:`resunetpp.artifact.record_problem`):
    a tampered record (``std`` infinite, ``num_classes`` ``"three"``) is refused naming the field."""
    problem = record_problem(meta)
    if problem is None and "model" not in meta:
        problem = RecordFieldError("model", "missing")
    if problem is not None:
        raise CheckpointError(path, record_error(path, problem).problem)
    try:
        config = ModelConfig.from_dict(meta["model"])
        pre = Preprocessing.from_dict(meta.get("preprocessing") or {})
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid config record ({e})") from None
    names = list(meta.get("class_names") or [f"class{i}" for i in range(config.num_classes)])
    if len(names) != config.num_classes:
        raise CheckpointError(path, f"invalid config record: field class_names: names {len(names)} classes for a "
                                    f"{config.num_classes}-class model")
    return Checkpoint(config, state, pre, names, dict(meta.get("provenance") or {}))


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Read a checkpoint safely. Any problem raises :class:`CheckpointError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "file is empty")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:  # no read permission is not "not a valid file" (nor "No such file")
        raise CheckpointError(path, f"cannot read the checkpoint ({e.strerror or e})") from None
    if path.suffix == ".safetensors":
        ckpt = _load_safetensors(path)
    else:
        ckpt = _load_torch(path)
    ckpt.path = path
    ckpt.sha256 = file_sha256(path)
    if verify:
        ckpt.build_model()  # raises CheckpointError on missing/extra keys or wrong shapes
    return ckpt


def _load_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"not a valid safetensors file ({str(e).splitlines()[0]})") from None
    if METADATA_KEY not in meta:
        raise CheckpointError(path, "safetensors file has no resunetpp record (not a checkpoint of this toolkit)")
    try:
        record = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(path, "resunetpp record is not valid JSON") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return _from_metadata(record, state, path)


def unpickling_reason(error: Exception) -> str:
    """The specific sentence of a ``weights_only`` refusal (``unsupported GLOBAL posix.system ...``),
    not torch's generic preamble about changed defaults or its advice to allow-list the global."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln:
            return ln.removeprefix("WeightsUnpickler error:").strip().split(". ")[0].rstrip(".")
    return lines[-1] if lines else "unsafe pickle"


def safe_torch_load(path: Path, unreadable: str = "not a PyTorch checkpoint") -> object:
    """``torch.load(weights_only=True)``: pickled code is refused, never run.

    Raises :class:`CheckpointError` naming ``path``: "refused: ..." for a pickle holding objects
    other than tensors and plain containers, "<unreadable> (...)" for anything else it cannot read.
    """
    try:
        with warnings.catch_warnings():  # torch warns on pickle protocols it does not expect
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, "refused: file holds objects other than tensors, not loaded "
                                    f"({unpickling_reason(e)[:160]})") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes raise anything (IndexError, KeyError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"{unreadable} ({msg[:160]})") from None


def _load_torch(path: Path) -> Checkpoint:
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"expected a dict of weights, found {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = obj["state_dict"]
        meta = obj.get("resunetpp") or {"model": obj.get("config", {})}
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError:
                raise CheckpointError(path, "resunetpp record is not valid JSON") from None
        if not isinstance(meta, dict):
            raise CheckpointError(path, f"resunetpp record is a {type(meta).__name__}, expected a mapping")
    else:
        state, meta = obj, {"model": {}}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "state dict holds non-tensor values")
    state = {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()}
    if is_official_state_dict(state):
        try:
            state = map_official_state_dict(state)
        except KeyError as e:
            raise CheckpointError(path, f"official-port weights with an unknown key: {e.args[0]}") from None
    if not meta.get("model") and "head.weight" in state:
        meta = dict(meta)
        try:
            meta["model"] = infer_config(state).to_dict()
        except CheckpointError as e:
            raise CheckpointError(path, e.problem) from None
    return _from_metadata(meta, state, path)


def infer_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Widths, classes and input channels read off the weight shapes (for bare state dicts)."""
    try:
        f0 = state["stem.body.0.weight"].shape[0]
        return ModelConfig(
            in_channels=int(state["stem.body.0.weight"].shape[1]),
            num_classes=int(state["head.weight"].shape[0]),
            filters=(int(f0), int(state["encoder1.body.2.weight"].shape[0]),
                     int(state["encoder2.body.2.weight"].shape[0]), int(state["encoder3.body.2.weight"].shape[0])),
            bridge=int(state["bridge.project.weight"].shape[0]),
        )
    except KeyError as e:
        raise CheckpointError("<state dict>", f"cannot infer the architecture: key {e.args[0]!r} missing") from None
