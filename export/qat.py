"""Quantization-aware fine-tuning (QAT) of a checkpoint for the INT8 Q/DQ ONNX and OpenVINO IR.

Post-training INT8 leaves a few Kvasir-SEG validation images far from the FP32 masks (small,
faint polyps whose probabilities sit near 0.5; benchmarks/INT8.md), however many layers stay in
float. QAT fine-tunes the FP32 weights *through* a simulation of the deployed INT8 arithmetic so
that the quantized network reproduces the FP32 model's probabilities:

::

    teacher (the checkpoint, FP32, frozen) ----------------------> p_ref = sigmoid/softmax
                                                                         |
    student (a copy) with fake quantization at every convolution:        |  distillation loss:
        x --FQ(per-tensor, calibrated)--> Conv(FQ(W, per channel)) -------> KL(p_ref || student)
                                                                         |  [+ w * per-image
                                                                         |   soft Dice to the
                                                                         |   teacher's masks]

The simulated points (:class:`resunetpp.export.quantsim.QuantSim`) are exactly where
:func:`resunetpp.export.quantize.quantize_qdq` puts Q/DQ pairs with
the conv-only recipe: each convolution's input (signed INT8, symmetric, per-tensor ranges from
the same percentile calibration) and its weight (symmetric, per output channel); with
``outputs`` (the recipe's ``quantize_outputs``) each convolution's output as well.
Gradients pass the rounding with the straight-through estimator (``torch.fake_quantize_*``).
BatchNorm stays in inference mode (its statistics frozen), as it runs in the deployed graph.

The result is an ordinary FP32 checkpoint (the latent weights, no quantizer state): the
existing export recalibrates it and builds the Q/DQ ONNX and the OpenVINO IR from it, and judges
them against the *teacher* (``ExportOptions.reference``). Since per-channel symmetric weight
quantization commutes with a per-channel scale, folding BatchNorm into a neighbouring convolution
at export does not change what was simulated.

References: B. Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (fake quantization, STE); G. Hinton et al.,
"Distilling the Knowledge in a Neural Network", 2015 (soft targets).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resunetpp.errors import ResUNetError
from resunetpp.export.quantsim import QuantSim, sim_ranges


@dataclass(frozen=True)
class QATOptions:
    epochs: int = 2
    lr: float = 2e-5
    batch_size: int = 4
    percentile: float = 99.99
    #: The export's calibration method, simulated by :func:`resunetpp.export.quantsim.sim_ranges`.
    method: str = "percentile"
    keep_modules: tuple[str, ...] = ()
    seed: int = 0
    flips: bool = True
    #: Weight of the per-image soft-Dice term against the teacher's masks (0: KL alone). The KL is
    #: a mean over pixels, so a small polyp's few boundary pixels barely move it, while the goal is
    #: a per-image Dice; this term gives every image's mask the same say.
    dice_weight: float = 0.0
    #: Fake-quantize convolution outputs too (the Q/DQ recipe's ``quantize_outputs``).
    outputs: bool = False

    def check(self) -> None:
        problems = []
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"QAT epochs must be a positive integer, got {self.epochs!r}")
        if not self.lr > 0:
            problems.append(f"QAT learning rate must be positive, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"QAT batch size must be positive, got {self.batch_size}")
        if not 0 < self.percentile <= 100:
            problems.append(f"percentile must be in (0, 100], got {self.percentile}")
        from resunetpp.export.quantize import CALIBRATION_METHODS

        if self.method not in CALIBRATION_METHODS:
            problems.append(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}")
        if not self.dice_weight >= 0:
            problems.append(f"Dice weight must be >= 0, got {self.dice_weight}")
        if problems:
            raise ResUNetError("; ".join(problems))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel KL divergence from the teacher's to the student's class probabilities
    (Bernoulli for one class, categorical for several): 0 when they agree exactly. Same
    gradients as BCE / soft cross-entropy against the teacher's probabilities."""
    if student_logits.shape[1] == 1:
        p = torch.sigmoid(teacher_logits)
        return (F.binary_cross_entropy_with_logits(student_logits, p)
                - F.binary_cross_entropy_with_logits(teacher_logits, p))
    p_log = F.log_softmax(teacher_logits, 1)
    return (p_log.exp() * (p_log - F.log_softmax(student_logits, 1))).sum(1).mean()


def mask_dice_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over images and classes of ``1 - soft Dice(student probabilities, teacher mask)``, the
    teacher's mask thresholded as the verification thresholds it (0.5 for one class, arg-max
    otherwise). Each image counts once, whatever its polyp's size; ``eps`` keeps empty masks
    defined (an empty prediction of an empty mask scores 0)."""
    if student_logits.shape[1] == 1:
        p = torch.sigmoid(student_logits)
        m = (teacher_logits > 0).to(p.dtype)
    else:
        p = F.softmax(student_logits, 1)
        m = F.one_hot(teacher_logits.argmax(1), teacher_logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter = (p * m).sum((2, 3))
    dice = (2 * inter + eps) / (p.sum((2, 3)) + m.sum((2, 3)) + eps)
    return (1 - dice).mean()


def _batches(images: Sequence[np.ndarray], size: int, rng: random.Random, flips: bool) -> Iterable[torch.Tensor]:
    order = list(range(len(images)))
    rng.shuffle(order)
    for s in range(0, len(order), size):
        x = torch.from_numpy(np.stack([images[i] for i in order[s:s + size]])).float()
        if flips:
            if rng.random() < 0.5:
                x = x.flip(-1)
            if rng.random() < 0.5:
                x = x.flip(-2)
        yield x


def qat_finetune(model: nn.Module, train_images: Sequence[np.ndarray], calib_images: Sequence[np.ndarray],
                 options: QATOptions, log: Callable[[str], None] = lambda _m: None) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``model`` (raw logits out) through INT8 fake quantization.

    ``train_images`` and ``calib_images`` are preprocessed ``(C, H, W)`` arrays (the training and
    calibration images; never the evaluation images). Returns the fine-tuned FP32 model (no
    quantizers left) and a record: per-epoch distillation loss, before/after, the settings.
    """
    options.check()
    if not train_images or not calib_images:
        raise ResUNetError("QAT needs training and calibration images")
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    teacher = model.eval()
    student = copy.deepcopy(model).eval()  # eval: BatchNorm keeps its statistics, as deployed
    for p in student.parameters():
        p.requires_grad_(True)
    sim = QuantSim(student, options.keep_modules, outputs=options.outputs,
                   **sim_ranges(options.method, options.percentile))
    sim.observe(len(calib_images))
    with torch.no_grad():
        for x in _batches(calib_images, options.batch_size, random.Random(0), flips=False):
            student(x)
    sim.freeze()

    def evaluate() -> float:
        losses = []
        with torch.no_grad():
            for x in _batches(calib_images, options.batch_size, random.Random(0), flips=False):
                losses.append(float(distillation_loss(student(x), teacher(x))))
        return float(np.mean(losses))

    before = evaluate()
    log(f"QAT: {len(sim.convs)} convolutions fake-quantized; distillation loss on the calibration "
        f"images before {before:.5f}")
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=options.lr)
    steps = options.epochs * math.ceil(len(train_images) / options.batch_size)
    step = 0
    history = []
    t0 = time.time()
    for epoch in range(options.epochs):
        losses = []
        for x in _batches(train_images, options.batch_size, rng, options.flips):
            for g in opt.param_groups:  # cosine decay to 0 over the run
                g["lr"] = options.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                target = teacher(x)
            logits = student(x)
            loss = distillation_loss(logits, target)
            if options.dice_weight:
                loss = loss + options.dice_weight * mask_dice_loss(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "time_s": round(time.time() - t0, 1)})
        log(f"QAT epoch {epoch + 1}/{options.epochs}: distillation loss {history[-1]['loss']:.5f} "
            f"({time.time() - t0:.0f}s)")
    after = evaluate()
    log(f"QAT: distillation loss on the calibration images after {after:.5f}")
    sim.remove()
    record = {"options": {**asdict(options), "keep_modules": list(options.keep_modules)},
              "quantized_convolutions": len(sim.convs), "train_images": len(train_images),
              "calibration_images": len(calib_images), "history": history,
              "calibration_loss_before": before, "calibration_loss_after": after}
    return student, record


def qat_checkpoint(checkpoint: Path, train_images: Sequence[np.ndarray], calib_images: Sequence[np.ndarray],
                   options: QATOptions, out: Path, log: Callable[[str], None] = lambda _m: None,
                   equalize_alpha: float | None = None) -> Path:
    """:func:`qat_finetune` a checkpoint file and save the result (fp32) at ``out``, with lineage.

    With ``equalize_alpha``, the model's activation ranges are equalized first
    (:mod:`resunetpp.export.equalize`, same FP32 function), so that QAT fine-tunes the parametrization the
    export quantizes."""
    from resunetpp.export.equalize import equalize
    from resunetpp.checkpoint import Checkpoint, lineage, load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    net = ckpt.build_model()
    if equalize_alpha is not None:
        equalize(net, (x[None] for x in calib_images), equalize_alpha)
    model, record = qat_finetune(net, train_images, calib_images, options, log)
    record["equalize_alpha"] = equalize_alpha
    origin = lineage(checkpoint, ckpt)
    prov = {"trained_with": "resunetpp quantize --qat-epochs", "qat": record, "lineage": origin,
            "int8_reference": {"path": origin["init_from"], "sha256": origin["init_sha256"]}}
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(Checkpoint(ckpt.config, sd, ckpt.preprocessing, list(ckpt.class_names), prov), out)


__all__ = ["QATOptions", "distillation_loss", "mask_dice_loss", "qat_and_export", "qat_checkpoint", "qat_finetune"]


def qat_and_export(o, qat: QATOptions, train_count: int | None = None,
                   log: Callable[[str], None] = lambda _m: None):
    """``resunetpp quantize --qat-epochs``: QAT on ``o.calib``'s split, then the INT8 Q/DQ ONNX and
    OpenVINO IR of the result, judged on ``o.eval`` against the original checkpoint.

    ``o`` is an :class:`resunetpp.export.sensitivity.QuantizeOptions`. Writes ``o.out/model_qat.safetensors``,
    the artifacts and ``export_report.json`` (artifacts are written even below the goal, like
    ``--allow-accuracy-drop``; the caller judges them). Returns the export report.
    """
    from resunetpp.export import calibration as cal
    from resunetpp.export.pipeline import ExportOptions, run_export
    from resunetpp.export.quantize import NNCFRecipe, QDQRecipe
    from resunetpp.checkpoint import load_checkpoint

    qat.check()
    ckpt = load_checkpoint(o.checkpoint)
    pre = ckpt.preprocessing if o.image_size is None else ckpt.preprocessing.with_size(o.image_size)
    train = cal.select_images(o.calib, o.calib_split, train_count, role="QAT training", default_split="train")
    calib = cal.select_images(o.calib, o.calib_split, o.calib_count, role="calibration", default_split="train")
    evset = cal.select_images(o.eval, o.eval_split, o.eval_count, role="evaluation", default_split="val")
    cal.check_disjoint(train, evset)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"QAT on {len(train)} images ({train.source}), ranges from {len(calib)}, judged on {len(evset)} "
        f"held-out images ({evset.source})")
    path = qat_checkpoint(o.checkpoint, list(train.inputs(pre)), list(calib.inputs(pre)), qat,
                          out / "model_qat.safetensors", log, equalize_alpha=o.equalize_alpha)
    recipe = dict(keep_modules=qat.keep_modules, conv_only=o.ops == "conv")
    options = ExportOptions(
        checkpoint=path, out=out, formats=("onnx", "openvino"), precisions=("int8",),
        calib=Path(o.calib), calib_split=o.calib_split, calib_count=o.calib_count,
        eval=Path(o.eval), eval_split=o.eval_split, eval_count=o.eval_count,
        image_size=o.image_size, allow_accuracy_drop=True, reference=Path(o.checkpoint),
        qdq=QDQRecipe(method=o.method, percentile=o.percentile, quantize_outputs=qat.outputs,
                      equalize_alpha=o.equalize_alpha, bias_correction_images=o.bias_correction_images, **recipe),
        nncf=NNCFRecipe(**recipe))
    return run_export(options)
