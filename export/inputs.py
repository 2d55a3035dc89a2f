"""What an export is verified on: the calibration and held-out image sets, the verification set
every artifact is compared on (with the FP32 reference outputs), and batching."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from resunetpp.export import calibration as cal
from resunetpp.export.options import ExportOptions
from resunetpp.checkpoint import Checkpoint
from resunetpp.errors import ResUNetError
from resunetpp.preprocess import Preprocessing

#: Images per verification batch.
VERIFY_BATCH = 4


@dataclass
class VerificationSet:
    """Preprocessed images (and masks) every artifact is compared on, with the reference outputs."""

    source: str
    origin: str | None
    names: list[str]
    inputs: list[np.ndarray]
    sizes: list[tuple[int, int]]
    masks: list[np.ndarray | None]
    reference: list[np.ndarray] = field(default_factory=list)
    int8_reference: list[np.ndarray] | None = None  # ExportOptions.reference's outputs, when given
    int8_reference_record: dict | None = None
    #: what ``reference`` is: PyTorch's outputs unless the FP32 graph gave them (ExportRun.graph_reference)
    reference_record: dict = field(default_factory=lambda: {"reference": "PyTorch FP32 (channels-last)"})

    def record(self) -> dict:
        rec = {"source": self.source, "from": self.origin, "images": len(self.inputs),
               "with_masks": any(m is not None for m in self.masks), **self.reference_record}
        if self.int8_reference_record:
            rec["int8_reference"] = self.int8_reference_record
        return rec


def image_sets(options: ExportOptions, need_eval: bool) -> tuple[cal.ImageSet | None, cal.ImageSet | None]:
    calib = cal.select_images(options.calib, options.calib_split, options.calib_count, role="calibration",
                              default_split="train") if options.calib else None
    ev = None
    if options.eval is not None:
        ev = cal.select_images(options.eval, options.eval_split, options.eval_count, role="evaluation",
                               default_split="val")
    elif options.calib is not None and (options.eval_split or (options.calib / "val.txt").is_file()) \
            and (options.calib / "images").is_dir():
        ev = cal.select_images(options.calib, options.eval_split or "val", options.eval_count, role="evaluation",
                               default_split=None)
    if need_eval and ev is None:
        where = f"{options.calib}: " if options.calib is not None else ""
        why = ("is a plain image folder, so it holds no held-out images; "
               if options.calib is not None and not (options.calib / "images").is_dir()
               else "has no val.txt, so it holds no held-out images; " if options.calib is not None else "")
        raise ResUNetError(f"{where}{why}INT8 accuracy is measured on held-out images: pass --eval DIR (or a "
                           "--calib dataset root that has val.txt)")
    if calib is not None and ev is not None:
        cal.check_disjoint(calib, ev)
    return calib, ev


def verification_set(ckpt: Checkpoint, pre: Preprocessing, calib: cal.ImageSet | None,
                      ev: cal.ImageSet | None, limit: int) -> VerificationSet:
    """Held-out images when there are some, else (no INT8 then) the first ``limit`` calibration
    images, else a fixed synthetic sample."""
    chosen = ev or calib
    if chosen is None:
        images = cal.synthetic_images(pre)
        return VerificationSet("synthetic", None, [f"synthetic{i}" for i in range(len(images))],
                               [pre.apply(im) for im in images], [im.shape[:2] for im in images], [None] * len(images))
    names, inputs, sizes, masks = [], [], [], []
    for i, stem in enumerate(chosen.stems[:limit]):
        image, mask = chosen.load(i, pre.channels, ckpt.config.num_classes)
        names.append(stem)
        inputs.append(pre.apply(image))
        sizes.append(image.shape[:2])
        masks.append(mask)
    return VerificationSet(chosen.role, str(chosen.source) + (f" ({chosen.split})" if chosen.split else ""),
                           names, inputs, sizes, masks)


def batches(inputs: Iterable[np.ndarray], size: int, fixed: bool) -> Iterator[np.ndarray]:
    """Stack consecutive equal-shape inputs into batches (padded to ``size`` when ``fixed``)."""
    pending: list[np.ndarray] = []
    for x in inputs:
        if pending and (len(pending) == size or pending[0].shape != x.shape):
            yield np.stack(pending + [pending[-1]] * (size - len(pending) if fixed else 0))
            pending = []
        pending.append(x)
    if pending:
        yield np.stack(pending + [pending[-1]] * (size - len(pending) if fixed else 0))


__all__ = ["VERIFY_BATCH", "VerificationSet", "batches", "image_sets", "verification_set"]
