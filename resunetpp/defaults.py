"""Where the shipped default model and sample data live (both optional, inside the package).

``resunetpp evaluate`` with no MODEL or no ``--data`` falls back to these, and
``resunetpp info`` reports the model path as ``default_model``.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = PACKAGE_DIR / "weights" / "resunetpp_kvasir.safetensors"
DEFAULT_DATA = PACKAGE_DIR / "sample_data"
#: Where PyTorch runs (training, evaluation of a checkpoint, the bench's torch rows): ``auto`` picks
#: ``cuda`` when torch sees a GPU.
TORCH_DEVICES = ("auto", "cpu", "cuda")


def default_model_path() -> Path | None:
    """The shipped Kvasir-SEG checkpoint, or ``None`` when this install has none."""
    return DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None


def resolve_model(model: str | Path, name: str = "MODEL") -> str | Path:
    """``model`` itself, or the shipped checkpoint's path when it is ``"default"`` (one line naming
    ``name`` -- the argument as the user wrote it -- when this install ships none)."""
    if str(model) != "default":
        return model
    shipped = default_model_path()
    if shipped is None:
        from resunetpp.errors import ResUNetError

        raise ResUNetError(f"{name} 'default': this install ships no default model; pass a model file")
    return str(shipped)


def default_data_path() -> Path | None:
    """The shipped sample images (Kvasir-SEG layout), or ``None`` when this install has none."""
    return DEFAULT_DATA if DEFAULT_DATA.is_dir() else None
