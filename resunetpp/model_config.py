"""The model's configuration and input limits, without torch: ``ModelConfig``, its record checks
(:func:`model_config_problem`), the architectures, and the bounds on network input sizes.

Kept apart from :mod:`resunetpp.model` so that records, engines and the command line's choices
(``--architecture``) can be read without importing torch; :mod:`resunetpp.model` re-exports every
name here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from resunetpp.errors import RecordFieldError


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


#: Input height and width must be multiples of this (three stride-2 stages).
SIZE_MULTIPLE = 8
#: The largest network input side accepted anywhere (records, ``--image-size``, ``pad``-mode images):
#: one 4096x4096 input already needs about 10 GB of activations in the default model.
MAX_INPUT_SIZE = 4096


def input_size_problem(value: object) -> str | None:
    """``None`` for a valid network input side (an int, a multiple of :data:`SIZE_MULTIPLE`, at most
    :data:`MAX_INPUT_SIZE`); else what is wrong with it, e.g. ``must be a positive multiple of 8, at
    most 4096, got 7``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, got {value!r}"
    if not SIZE_MULTIPLE <= value <= MAX_INPUT_SIZE or value % SIZE_MULTIPLE:
        return f"must be a positive multiple of {SIZE_MULTIPLE}, at most {MAX_INPUT_SIZE}, got {value}"
    return None

ARCHITECTURES = {
    "resunetpp": None,  # the authors' model
    "resunetpp-sigmoid-attention": "sigmoid",  # opt-in variant: bounded attention gate
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters. ``ModelConfig()`` is the official configuration."""

    in_channels: int = 3
    num_classes: int = 1
    filters: tuple[int, int, int, int] = (16, 32, 64, 128)
    bridge: int = 256
    se_reduction: int = 8
    aspp_rates: tuple[int, ...] = (1, 6, 12, 18)
    architecture: str = "resunetpp"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        positive_int("in_channels", self.in_channels)
        positive_int("num_classes", self.num_classes)
        positive_int("bridge", self.bridge)
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        object.__setattr__(self, "aspp_rates", tuple(int(r) for r in self.aspp_rates))
        if len(self.filters) != 4:
            raise ValueError(f"filters must hold 4 widths (stem and three encoder stages), got {self.filters}")
        for f in self.filters:
            positive_int("each filter width", f)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {self.architecture!r}")

    @property
    def activation(self) -> str:
        """Output activation declared by the head: ``sigmoid`` (1 class) or ``softmax``."""
        return "sigmoid" if self.num_classes == 1 else "softmax"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["filters"] = list(self.filters)
        d["aspp_rates"] = list(self.aspp_rates)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        """From a record; an invalid field raises :class:`~resunetpp.errors.RecordFieldError`
        (:func:`model_config_problem`)."""
        problem = model_config_problem(d)
        if problem is not None:
            raise RecordFieldError(*problem)
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


#: Bounds on a model record's fields (a record is data from a file): class indices fit a uint8 mask.
MAX_CLASSES = 256
MAX_WIDTH = 8192


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def model_config_problem(d: object) -> tuple[str, str] | None:
    """The first invalid field of a model record as ``(field, problem)``, or ``None``.

    Types are strict (``num_classes`` ``"three"`` is refused, not converted) and values bounded:
    counts and widths positive integers (at most :data:`MAX_CLASSES` classes, widths up to
    :data:`MAX_WIDTH`), ``filters`` four widths, ``se_reduction`` at most the narrowest width
    (every squeeze-excitation keeps a unit), ``aspp_rates`` positive, ``architecture`` known.
    """
    if not isinstance(d, Mapping):
        return "", f"must be a mapping, got {type(d).__name__}"
    known = [f.name for f in fields(ModelConfig) if f.name != "extra"]
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        return unknown[0], f"unknown model config keys: {unknown} (known: {', '.join(known)})"
    for key, high in (("in_channels", 64), ("num_classes", MAX_CLASSES), ("bridge", MAX_WIDTH)):
        if key in d and not _int_in(d[key], 1, high):
            return key, f"must be an integer from 1 to {high}, got {d[key]!r}"
    filters = d.get("filters", ModelConfig.filters)
    if not isinstance(filters, (list, tuple)) or len(filters) != 4 or not all(_int_in(f, 1, MAX_WIDTH) for f in filters):
        return "filters", f"must be 4 integer widths from 1 to {MAX_WIDTH}, got {filters!r}"
    if "se_reduction" in d and not _int_in(d["se_reduction"], 1, min(filters)):
        return "se_reduction", (f"must be an integer from 1 to the narrowest width ({min(filters)}), "
                                f"got {d['se_reduction']!r}")
    rates = d.get("aspp_rates", ModelConfig.aspp_rates)
    if not isinstance(rates, (list, tuple)) or not rates or not all(_int_in(r, 1, 1024) for r in rates):
        return "aspp_rates", f"must be a list of positive integer dilation rates, got {rates!r}"
    if "architecture" in d and (not isinstance(d["architecture"], str) or d["architecture"] not in ARCHITECTURES):
        return "architecture", f"must be one of {', '.join(ARCHITECTURES)}, got {d['architecture']!r}"
    return None
