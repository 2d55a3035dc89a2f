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

The simulated points are exactly where :func:`export.quantize.quantize_qdq` puts Q/DQ pairs with
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
from torch.nn.utils import parametrize

from resunetpp.errors import ResUNetError

#: Signed INT8, symmetric: what ONNX Runtime's symmetric Q/DQ and TensorRT use (zero point 0).
QMIN, QMAX = -127, 127
#: Activation ranges the simulation reproduces: the export's ``percentile`` and ``mse`` methods
#: (``minmax`` is the 100th percentile).
SIM_METHODS = ("percentile", "mse")


def sim_ranges(method: str, percentile: float) -> dict:
    """:class:`QuantSim` range settings for the export's calibration ``method``: ``mse`` and
    ``percentile`` as they are, ``minmax`` as the 100th percentile, ``entropy`` (not simulated)
    approximated by the percentile."""
    if method == "mse":
        return {"method": "mse", "percentile": percentile}
    return {"method": "percentile", "percentile": 100.0 if method == "minmax" else percentile}


@dataclass(frozen=True)
class QATOptions:
    epochs: int = 2
    lr: float = 2e-5
    batch_size: int = 4
    percentile: float = 99.99
    #: The export's calibration method, simulated by :func:`sim_ranges`.
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


class _WeightFQ(nn.Module):
    """Per-output-channel symmetric INT8 fake quantization of a convolution weight."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        amax = w.detach().abs().amax(dim=tuple(range(1, w.dim()))).clamp_min(1e-8)
        scale = (amax / QMAX).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, QMIN, QMAX)


class _TopK:
    """Exact upper percentile of |x| over a stream of ``images`` images: keeps only the largest
    values the percentile can need (``ceil(tail * total) + 1``, the total known from the first
    batch's size per image)."""

    def __init__(self, percentile: float, images: int) -> None:
        self.tail = 1.0 - percentile / 100.0
        self.images = images
        self.seen = 0
        self.k = 0
        self.kept = torch.empty(0)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().abs().flatten().float()
        if not self.k:
            per_image = flat.numel() // max(1, x.shape[0])
            self.k = math.ceil(round(self.tail * per_image * self.images, 6)) + 1
        self.seen += flat.numel()
        both = torch.cat([self.kept, torch.topk(flat, min(self.k, flat.numel())).values])
        self.kept = torch.topk(both, min(self.k, both.numel())).values

    def value(self) -> float:
        if self.seen == 0:
            raise ResUNetError("no calibration data reached this quantization point")
        # the value at the percentile: the ceil(tail * n)-th largest, like numpy's 'higher' method
        k = max(1, math.ceil(round(self.tail * self.seen, 6)))  # 0.01 * 10000 is 100, not 100.0000001
        return float(self.kept[min(k, self.kept.numel()) - 1])


class _AbsHistogram:
    """Histogram of |x| over a stream, for :func:`export.ranges.mse_range`: ``BINS`` bins up to the
    first nonzero batch's largest value, extended with bins of the same width as larger values
    come (as ONNX Runtime's percentile calibrator collects it)."""

    BINS = 2048

    def __init__(self) -> None:
        self.hist = torch.zeros(0, dtype=torch.float64)
        self.width = 0.0
        self.largest = 0.0
        self.zeros = 0  # values seen before any nonzero one (they belong to the first bin)

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().flatten().float()
        m = float(a.max()) if a.numel() else 0.0
        if m <= 0.0 and not self.width:
            self.zeros += a.numel()
            return
        if not self.width:
            self.width = m / self.BINS
            self.hist = torch.zeros(self.BINS, dtype=torch.float64)
            self.hist[0] += self.zeros
        n = max(self.hist.numel(), math.ceil(m / self.width))
        if n > self.hist.numel():
            self.hist = torch.cat([self.hist, torch.zeros(n - self.hist.numel(), dtype=torch.float64)])
        idx = (a / self.width).long().clamp_(max=n - 1)
        self.hist += torch.bincount(idx, minlength=n).double()
        self.largest = max(self.largest, m)

    def value(self) -> float:
        from resunetpp.export.ranges import mse_range

        if not self.width:
            if self.zeros:
                return 0.0
            raise ResUNetError("no calibration data reached this quantization point")
        edges = np.arange(self.hist.numel() + 1, dtype=np.float64) * self.width
        return mse_range(self.hist.numpy(), edges, self.largest)


class QuantSim:
    """Fake quantization at every convolution of ``model`` outside ``keep_modules``.

    ``observe()`` collects activation ranges (the ``percentile`` of |x|, or with ``method="mse"``
    the range of :func:`export.ranges.mse_range`); ``freeze()`` turns them into fixed scales;
    ``remove()`` takes every hook and parametrization away, leaving the plain latent weights.
    """

    def __init__(self, model: nn.Module, keep_modules: Sequence[str] = (), percentile: float = 99.99,
                 outputs: bool = False, method: str = "percentile") -> None:
        if method not in SIM_METHODS:
            raise ResUNetError(f"simulated range method must be one of {', '.join(SIM_METHODS)}, got {method!r}")
        self.model = model
        self.method = method
        self.percentile = percentile
        self.convs: dict[str, nn.Conv2d] = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and not any(name == k or name.startswith(k + ".") for k in keep_modules):
                self.convs[name] = m
        unknown = [k for k in keep_modules if not any(n == k or n.startswith(k + ".")
                                                      for n, _ in model.named_modules())]
        if unknown:
            raise ResUNetError(f"module {unknown[0]!r} (kept in float) is not in the model")
        if not self.convs:
            raise ResUNetError("nothing to quantize: every convolution is kept in float")
        self.observers: dict[str, _TopK] | None = None
        self.amax: dict[str, float] = {}
        self.handles = []
        self.weight_fq: list[_WeightFQ] = []
        for name, conv in self.convs.items():
            self.weight_fq.append(_WeightFQ())
            parametrize.register_parametrization(conv, "weight", self.weight_fq[-1])
            self.handles.append(conv.register_forward_pre_hook(self._pre(name + ":in")))
            if outputs:
                self.handles.append(conv.register_forward_hook(self._post(name + ":out")))

    # -- activation points --
    def _fq(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if self.observers is not None:
            if key not in self.observers:
                self.observers[key] = (_AbsHistogram() if self.method == "mse"
                                       else _TopK(self.percentile, self.observe_images))
            self.observers[key].update(x)
            return x
        if key not in self.amax:
            return x  # not calibrated (yet): float
        scale = max(self.amax[key], 1e-8) / QMAX
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, QMIN, QMAX)

    def _pre(self, key: str):
        def hook(module, args):
            return (self._fq(key, args[0]),) + tuple(args[1:])
        return hook

    def _post(self, key: str):
        def hook(module, args, output):
            return self._fq(key, output)
        return hook

    def observe(self, images: int) -> None:
        """Collect ranges over the next forward passes (``images`` images in all) of the float
        model, as ONNX Runtime's calibration sees it: weights and activations unquantized."""
        self.observers = {}
        self.observe_images = images
        for fq in self.weight_fq:
            fq.enabled = False

    def freeze(self) -> dict[str, float]:
        if self.observers is None:
            raise ResUNetError("freeze() without observe() first")
        self.amax = {k: o.value() for k, o in self.observers.items()}
        self.observers = None
        for fq in self.weight_fq:
            fq.enabled = True
        return self.amax

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for conv in self.convs.values():
            if parametrize.is_parametrized(conv, "weight"):
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)


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
    (:mod:`export.equalize`, same FP32 function), so that QAT fine-tunes the parametrization the
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


__all__ = ["QATOptions", "QuantSim", "distillation_loss", "mask_dice_loss", "qat_checkpoint", "qat_finetune"]


def qat_and_export(o, qat: QATOptions, train_count: int | None = None,
                   log: Callable[[str], None] = lambda _m: None):
    """``resunetpp quantize --qat-epochs``: QAT on ``o.calib``'s split, then the INT8 Q/DQ ONNX and
    OpenVINO IR of the result, judged on ``o.eval`` against the original checkpoint.

    ``o`` is an :class:`export.sensitivity.QuantizeOptions`. Writes ``o.out/model_qat.safetensors``,
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
