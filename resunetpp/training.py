"""Training ResUNet++: Dice + BCE (CE + Dice for multi-class), on-device augmentation, AMP on CUDA,
atomic best/last checkpoints and exact resume.

The whole training set is decoded once and kept in memory at the training resolution (Kvasir-SEG's
880 training images take 170 MB at 256x256), then batches are augmented on the training device.

Optional *range regulariser* (``range_reg > 0``): a hinge penalty on the magnitude of the
attention products and decoder outputs, ``mean(relu(|a| - range_tau)^2)``. ResUNet++'s attention
multiplies two unbounded maps; since BatchNorm follows, the FP32 function does not care about
their scale and it drifts to values that overflow FP16 and defeat per-tensor INT8. The penalty
leaves the architecture untouched and keeps these maps bounded (see ``benchmarks/INT8.md``).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from resunetpp.atomic import atomic_path, clean_stale_temporaries, make_output_folder, write_json_atomic
from resunetpp.augment import augment
from resunetpp.checkpoint import Checkpoint, safe_torch_load, save_checkpoint
from resunetpp.data import SegmentationDataset
from resunetpp.errors import ResUNetError
from resunetpp.model import ModelConfig, ResUNetPlusPlus, count_parameters
from resunetpp.preprocess import Preprocessing

STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    data: str
    out: str
    train_split: str | None = "train"
    val_split: str | None = "val"
    epochs: int = 100
    batch_size: int = 16
    image_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    num_classes: int = 1
    class_names: list[str] = field(default_factory=lambda: ["polyp"])
    filters: tuple[int, int, int, int] = (16, 32, 64, 128)
    bridge: int = 256
    architecture: str = "resunetpp"
    range_reg: float = 0.0
    range_tau: float = 8.0
    time_budget_s: float | None = None
    init_from: str | None = None  # start from these weights (fine-tuning); not a resume
    channels_last: bool = True
    cpu_bf16: bool = False  # bf16 autocast on CPU (AVX512-BF16/AMX machines)
    val_every: int = 1
    workers: int = max(1, min(8, os.cpu_count() or 1))


def check_train_config(cfg: TrainConfig, resume: bool = False) -> None:
    """Refuse impossible settings with one line each, before any data is read."""
    from resunetpp.model_config import input_size_problem

    problems = []
    for name in ("epochs", "batch_size", "num_classes", "val_every", "workers"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    size_problem = input_size_problem(cfg.image_size)
    if size_problem:
        problems.append(f"image_size {size_problem}")
    if not cfg.lr > 0:
        problems.append(f"lr must be positive, got {cfg.lr}")
    if cfg.range_reg < 0 or not cfg.range_tau > 0:
        problems.append(f"range_reg must be >= 0 and range_tau > 0, got {cfg.range_reg} and {cfg.range_tau}")
    if cfg.time_budget_s is not None and not cfg.time_budget_s > 0:
        problems.append(f"time_budget_s must be positive, got {cfg.time_budget_s}")
    if isinstance(cfg.warmup_epochs, bool) or not isinstance(cfg.warmup_epochs, int) or cfg.warmup_epochs < 0:
        problems.append(f"warmup_epochs must be an integer >= 0, got {cfg.warmup_epochs!r}")
    if cfg.init_from and not resume and not Path(cfg.init_from).is_file():  # a resume has its weights
        problems.append(f"init_from {cfg.init_from}: no such checkpoint file")
    if len(cfg.class_names) != cfg.num_classes:
        problems.append(f"{cfg.num_classes} class(es) need as many class names, got {len(cfg.class_names)}: "
                        f"{list(cfg.class_names)}")
    if problems:
        raise ResUNetError("; ".join(problems))
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ResUNetError(f"{cfg.out}: --out must be a folder, this is a file")
    state = Path(cfg.out) / STATE_FILE
    if not resume and state.is_file():
        raise ResUNetError(f"{cfg.out}: already holds a training run ({STATE_FILE}); pass --resume to continue "
                           "it or choose another --out")


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to train in channels-last memory format.

    On CPU only for widths >= 16: torch 2.13's oneDNN (3.12) corrupts the heap in the backward of
    a strided 1x1 convolution with channels-last input and fewer than 16 input channels (e.g.
    ``Conv2d(8, 16, 1, stride=2)`` on a (3, 8, 16, 16) batch: "double free or corruption"), which
    narrow models hit in their encoder shortcuts. NCHW takes another kernel and is unaffected.
    """
    return cfg.channels_last and (device.type == "cuda" or min(cfg.filters) >= 16)


def _load_state(path: Path) -> dict:
    state = safe_torch_load(path, "unreadable training state")
    if not isinstance(state, dict) or "train_config" not in state:
        raise ResUNetError(f"{path}: not a resunetpp training state")
    return state


def resume_config(out: str | Path, *, epochs: int | None = None, time_budget_s: float | None = None,
                  device: str | None = None) -> TrainConfig:
    """The configuration of the run in ``out``, with only the given (non-``None``) settings changed.

    Settings left out keep the interrupted run's values, so ``--resume`` alone finishes the run
    exactly as it was started.
    """
    state_path = Path(out) / STATE_FILE
    if not state_path.is_file():
        raise ResUNetError(f"{state_path}: nothing to resume (no training state in --out)")
    saved = json.loads(_load_state(state_path)["train_config"])
    saved["filters"] = tuple(saved["filters"])
    saved["out"] = str(out)
    for key, value in (("epochs", epochs), ("time_budget_s", time_budget_s), ("device", device)):
        if value is not None:
            saved[key] = value
    try:
        return TrainConfig(**saved)
    except TypeError as e:
        raise ResUNetError(f"{state_path}: training state from another version ({e})") from None


def default_splits(data: str | Path, train_split: str | None, val_split: str | None
                   ) -> tuple[str | None, str | None]:
    """Splits to use when none is given: ``DATA/train.txt`` and ``DATA/val.txt`` if they exist,
    else every image for training and no validation."""
    root = Path(data)
    if train_split is None and (root / "train.txt").is_file():
        train_split = "train"
    if val_split is None and (root / "val.txt").is_file():
        val_split = "val"
    return train_split, val_split


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ResUNetError("--device cuda: no CUDA device is available to torch")
    if device not in ("cpu", "cuda"):
        raise ResUNetError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def load_resized(dataset: SegmentationDataset, size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs of ``dataset`` as uint8 tensors: images (N, C, S, S), masks (N, S, S)."""

    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        img, mask = dataset.load(i)
        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        img = np.asarray(pil.resize((size, size), Image.BILINEAR))
        if img.ndim == 2:
            img = img[:, :, None]
        if dataset.num_classes == 1:
            m = np.asarray(Image.fromarray(mask * 255).resize((size, size), Image.BILINEAR)) > 127
        else:
            m = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
        return img.transpose(2, 0, 1), m.astype(np.uint8)

    with ThreadPoolExecutor(workers) as ex:
        pairs = list(ex.map(one, range(len(dataset))))
    return torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs]))


class RangeMonitor:
    """Forward hooks on the attention products and decoder/head outputs (the unbounded maps)."""

    def __init__(self, model: ResUNetPlusPlus) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name.endswith(".attention") or name in ("decoder1", "decoder2", "decoder3", "bridge", "head_aspp"):
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def fn(_m, _i, out):
            self.outputs[name] = out
        return fn

    def penalty(self, tau: float) -> torch.Tensor:
        terms = [F.relu(t.float().abs() - tau).pow(2).mean() for t in self.outputs.values()]
        return torch.stack(terms).sum()

    def per_image_amax(self) -> dict[str, list[float]]:
        return {k: v.detach().float().flatten(1).abs().amax(1).tolist() for k, v in self.outputs.items()}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Binary: BCE + soft Dice. Multi-class: CE + mean soft Dice over classes. ``target`` (N,H,W)."""
    eps = 1.0
    if num_classes == 1:
        t = target.float()[:, None]
        bce = F.binary_cross_entropy_with_logits(logits, t)
        p = torch.sigmoid(logits)
        inter = (p * t).sum((1, 2, 3))
        d = 1 - (2 * inter + eps) / (p.sum((1, 2, 3)) + t.sum((1, 2, 3)) + eps)
        return bce + d.mean()
    ce = F.cross_entropy(logits, target.long())
    p = torch.softmax(logits, 1)
    oh = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).float()
    inter = (p * oh).sum((2, 3))
    d = 1 - (2 * inter + eps) / (p.sum((2, 3)) + oh.sum((2, 3)) + eps)
    return ce + d.mean()


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))


def _batch_dice(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    if num_classes == 1:
        p = (logits[:, 0] > 0)
        t = target.bool()
    else:
        p = logits.argmax(1) > 0
        t = target > 0
    inter = (p & t).flatten(1).sum(1).float()
    s = p.flatten(1).sum(1).float() + t.flatten(1).sum(1).float()
    d = torch.where(s > 0, 2 * inter / s.clamp(min=1), torch.ones_like(s))
    return d.tolist()


@dataclass
class _Data:
    """The training (and validation) pairs, resized once and moved to the training device."""

    train_ds: SegmentationDataset
    val_ds: SegmentationDataset | None
    xi: torch.Tensor  # (N, C, S, S) uint8 images
    xm: torch.Tensor  # (N, S, S) uint8 masks
    vi: torch.Tensor | None
    vm: torch.Tensor | None


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _resumed(cfg: TrainConfig, state_path: Path) -> tuple[TrainConfig, dict]:
    """The saved training state and its configuration; the settings a resume may change come from ``cfg``."""
    if not state_path.is_file():
        raise ResUNetError(f"{state_path}: nothing to resume (no training state in --out)")
    state = _load_state(state_path)
    saved = json.loads(state["train_config"])
    for k in ("epochs", "time_budget_s", "device", "workers", "out"):
        saved[k] = getattr(cfg, k)  # these may change on resume
    saved["filters"] = tuple(saved["filters"])
    return TrainConfig(**saved), state


def _load_data(cfg: TrainConfig, device: torch.device, log) -> _Data:
    """Read the train and val splits (refusing an overlap), resize them and move them to ``device``."""
    t0 = time.time()
    train_ds = SegmentationDataset(cfg.data, cfg.train_split, cfg.num_classes)
    val_ds = SegmentationDataset(cfg.data, cfg.val_split, cfg.num_classes) if cfg.val_split else None
    if val_ds is not None:
        overlap = {s.stem for s in train_ds.samples} & {s.stem for s in val_ds.samples}
        if overlap:
            raise ResUNetError(f"train and val splits share {len(overlap)} image(s), e.g. {sorted(overlap)[0]!r}")
    xi, xm = load_resized(train_ds, cfg.image_size, cfg.workers)
    vi, vm = load_resized(val_ds, cfg.image_size, cfg.workers) if val_ds else (None, None)
    log(f"loaded {len(train_ds)} train / {len(val_ds) if val_ds else 0} val images at {cfg.image_size}px "
        f"in {time.time() - t0:.1f}s; device {device}")
    xi, xm = xi.to(device), xm.to(device)
    if vi is not None:
        vi, vm = vi.to(device), vm.to(device)
    return _Data(train_ds, val_ds, xi, xm, vi, vm)


class _Run:
    """One training run: the model, optimizer and bookkeeping that :func:`train` steps through.

    Built fresh, from ``--init-from`` weights, or from a saved training state (exact resume).
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, data: _Data, state: dict | None, out: Path,
                 log) -> None:
        self.cfg, self.device, self.data, self.state, self.out, self.log = cfg, device, data, state, out, log
        self.mcfg = ModelConfig(in_channels=3, num_classes=cfg.num_classes, filters=tuple(cfg.filters),
                                bridge=cfg.bridge, architecture=cfg.architecture)
        self.pre = Preprocessing(size=(cfg.image_size, cfg.image_size))
        self.mean = torch.tensor(self.pre.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(self.pre.std, device=device).view(1, -1, 1, 1)
        model = ResUNetPlusPlus(self.mcfg)
        self.lineage = self._init_weights(model)
        self.model = model.to(device)
        self.channels_last = use_channels_last(cfg, device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.use_amp = (cfg.amp and device.type == "cuda") or (cfg.cpu_bf16 and device.type == "cpu")
        self.amp_dtype = torch.bfloat16
        self.monitor = RangeMonitor(self.model)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.steps_per_epoch = max(1, len(data.train_ds) // cfg.batch_size)
        self.total_epochs = cfg.epochs
        self.start_epoch = 0
        self.history: list[dict] = []
        self.best = -1.0
        self.elapsed_before = 0.0
        if state is not None:
            self._restore(state)
        self.epoch = self.start_epoch
        self.epoch_seconds = 0.0  # the last epoch's duration
        self.t_start = time.time()

    # -- setup --
    def _init_weights(self, model: ResUNetPlusPlus) -> dict | None:
        """Load ``--init-from`` weights into ``model``; the lineage every checkpoint of the run keeps."""
        if self.state is not None and "lineage" in self.state:
            return json.loads(self.state["lineage"])
        if not self.cfg.init_from:
            return None
        from resunetpp.checkpoint import lineage as lineage_of, load_checkpoint, load_state_dict_checked

        init = load_checkpoint(self.cfg.init_from, verify=False)
        if init.config != self.mcfg:
            raise ResUNetError(f"{self.cfg.init_from}: --init-from holds another architecture ({init.config}) "
                               f"than the one asked for ({self.mcfg})")
        load_state_dict_checked(model, init.state_dict, self.cfg.init_from)
        # Where the starting weights came from, kept in every checkpoint of this run: the chain of
        # runs that made a fine-tuned model stays readable even after the init file is replaced.
        lineage = lineage_of(self.cfg.init_from, init)
        self.log(f"initialised from {self.cfg.init_from}")
        return lineage

    def _restore(self, state: dict) -> None:
        """Weights, optimizer, epoch count, history and generator of the saved state."""
        from resunetpp.checkpoint import load_checkpoint, load_state_dict_checked

        if isinstance(state.get("model"), dict):  # the weights saved with this state: same epoch for sure
            load_state_dict_checked(self.model, {k: v.float() if v.is_floating_point() else v
                                                 for k, v in state["model"].items()}, self.out / STATE_FILE)
        else:  # a state written before the weights were kept in it
            last = load_checkpoint(self.out / "last.safetensors", verify=False)
            load_state_dict_checked(self.model, last.state_dict, self.out / "last.safetensors")
        self.opt.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        self.total_epochs = int(state["total_epochs"]) if self.cfg.time_budget_s else self.cfg.epochs
        self.history = json.loads(state["history"])
        self.best = float(state["best"])
        self.elapsed_before = float(state["elapsed_s"])
        self.gen.set_state(state["generator"])
        self.log(f"resuming after epoch {self.start_epoch} of {self.total_epochs}")

    # -- one epoch --
    def train_epoch(self, on_step) -> dict:
        """One pass over the training set in a fresh random order; ``on_step(i, loss)`` after each
        step. Returns the epoch's history row (loss, last learning rate, time, range penalty)."""
        cfg, d, model, opt = self.cfg, self.data, self.model, self.opt
        model.train()
        perm = torch.randperm(len(d.train_ds), generator=self.gen)
        ep_t = time.time()
        losses, regs = [], []
        for it in range(self.steps_per_epoch):
            step = self.epoch * self.steps_per_epoch + it
            lr = _lr_at(step, self.total_epochs * self.steps_per_epoch, cfg.warmup_epochs * self.steps_per_epoch,
                        cfg.lr)
            for gparam in opt.param_groups:
                gparam["lr"] = lr
            idx = perm[it * cfg.batch_size:(it + 1) * cfg.batch_size].to(self.device)
            img = d.xi[idx].float() / 255.0
            if cfg.num_classes == 1:
                msk = d.xm[idx].float()[:, None]
            else:
                msk = F.one_hot(d.xm[idx].long(), cfg.num_classes).permute(0, 3, 1, 2).float()
            img, msk = augment(img, msk, self.gen)
            target = (msk[:, 0] > 0.5).float() if cfg.num_classes == 1 else msk.argmax(1)
            img = ((img - self.mean) / self.std)
            if self.channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = model(img)
            loss = segmentation_loss(logits.float(), target, cfg.num_classes)
            if cfg.range_reg > 0:
                reg = self.monitor.penalty(cfg.range_tau)
                regs.append(reg.detach())
                loss = loss + cfg.range_reg * reg
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {self.epoch + 1}, step {it}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(loss.detach())
            on_step(it, losses[-1])
        self.epoch += 1
        self.epoch_seconds = ep_time = time.time() - ep_t
        row = {"epoch": self.epoch, "loss": float(torch.stack(losses).mean()), "lr": lr, "time_s": round(ep_time, 2)}
        if regs:
            row["range_penalty"] = float(torch.stack(regs).mean())
        return row

    def fit_time_budget(self, t0: float) -> bool:
        """With ``time_budget_s``, fix the number of epochs after the second one; True when it did.

        Sized from the *second* epoch: the first carries the warm-up (cuDNN autotuning, allocator
        growth) and ran ~5x slower than the rest on an H200, which cut a 440 s budget to 21
        epochs. Warm-up LR steps (warmup_epochs >= 2) do not depend on the total.
        """
        cfg, ep_time = self.cfg, self.epoch_seconds
        if not (cfg.time_budget_s and self.epoch == self.start_epoch + 2 and self.state is None):
            return False
        fit = int((cfg.time_budget_s - (time.time() - t0)) / max(ep_time, 1e-3))
        self.total_epochs = max(self.epoch, min(cfg.epochs, self.epoch + fit))
        self.log(f"time budget {cfg.time_budget_s:.0f}s: training {self.total_epochs} epochs ({ep_time:.1f}s each)")
        return True

    # -- validation --
    def due_for_validation(self) -> bool:
        return self.data.vi is not None and (self.epoch % self.cfg.val_every == 0 or self.epoch == self.total_epochs)

    def validate_epoch(self, row: dict) -> float:
        """Validation Dice at the training resolution, with the monitored maps' ranges, into ``row``."""
        vd, amax = validate(self.model, self.data.vi, self.data.vm, self.mean, self.std, self.cfg, self.use_amp,
                            self.amp_dtype, self.monitor)
        row["val_dice"] = vd
        row["amax_p50"] = {k: float(np.median(v)) for k, v in amax.items()}
        row["amax_max"] = {k: float(np.max(v)) for k, v in amax.items()}
        return vd

    # -- checkpointing --
    def checkpoint(self, val_dice: float | None) -> Checkpoint:
        cfg = self.cfg
        prov = {
            "trained_with": "resunetpp train",
            "train_config": {k: v for k, v in asdict(cfg).items() if k != "workers"},
            "epochs_completed": self.epoch,
            "val_dice_train_resolution": val_dice,
            "train_images": len(self.data.train_ds),
            "elapsed_s": round(self.elapsed_before + time.time() - self.t_start, 1),
            "device": torch.cuda.get_device_name(0) if self.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "parameters": count_parameters(self.model),
        }
        if self.lineage is not None:
            prov["lineage"] = self.lineage
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return Checkpoint(self.mcfg, sd, self.pre, list(cfg.class_names), prov)

    def save_epoch(self, row: dict, val_dice: float | None) -> None:
        """The epoch's files, one after another, each atomic: last (and best), the state, the history."""
        self.history.append(row)
        ck = self.checkpoint(val_dice)
        save_checkpoint(ck, self.out / "last.safetensors")
        if val_dice is not None and val_dice > self.best:
            self.best = val_dice
            save_checkpoint(ck, self.out / "best.safetensors")
        # The weights travel with the optimizer state and epoch count: a kill between this
        # epoch's writes may leave last.safetensors an epoch ahead; resume starts from these.
        # Serialized in memory, then written atomically: a full disk is an OSError (one line), not
        # torch's "PytorchStreamWriter failed writing file".
        buffer = io.BytesIO()
        torch.save({"model": ck.state_dict, "optimizer": self.opt.state_dict(), "epoch": self.epoch,
                    "total_epochs": self.total_epochs,
                    "history": json.dumps(self.history), "best": self.best, "generator": self.gen.get_state(),
                    "elapsed_s": self.elapsed_before + time.time() - self.t_start,
                    "train_config": json.dumps(asdict(self.cfg)),
                    "lineage": json.dumps(self.lineage)}, buffer)
        with atomic_path(self.out / STATE_FILE) as tmp:
            tmp.write_bytes(buffer.getbuffer())
        write_json_atomic(self.out / "history.json", self.history)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train and return the history. Writes ``last.safetensors``, ``best.safetensors``,
    ``train_state.pt`` and ``history.json`` into ``cfg.out`` (all atomically)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    check_train_config(cfg, resume)
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    _seed(cfg.seed)
    state = None
    if resume:
        cfg, state = _resumed(cfg, out / STATE_FILE)
    if out.is_dir():  # what a killed run left: its temporaries (never a finished file)
        clean_stale_temporaries(out)
    t0 = time.time()
    data = _load_data(cfg, device, log)
    make_output_folder(out)
    run = _Run(cfg, device, data, state, out, log)

    cols = [TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[total_epochs]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val Dice {task.fields[vdice]}"), TimeElapsedColumn()]
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=run.steps_per_epoch, epoch=run.epoch, total_epochs=run.total_epochs,
                            loss=float("nan"), vdice="-")

        def on_step(it: int, loss: torch.Tensor) -> None:
            if progress and (it % 5 == 0 or it == run.steps_per_epoch - 1):
                bar.update(task, completed=it + 1, loss=float(loss))

        while run.epoch < run.total_epochs:
            bar.reset(task, total=run.steps_per_epoch)
            bar.update(task, epoch=run.epoch + 1)
            row = run.train_epoch(on_step)
            if run.fit_time_budget(t0):
                bar.update(task, total_epochs=run.total_epochs)
            vd = None
            if run.due_for_validation():
                vd = run.validate_epoch(row)
                bar.update(task, vdice=f"{vd:.4f}")
            run.save_epoch(row, vd)
            msg = f"epoch {run.epoch}/{run.total_epochs} loss {row['loss']:.4f} lr {row['lr']:.2e} {run.epoch_seconds:.1f}s"
            if vd is not None:
                msg += f" val Dice {vd:.4f} (at {cfg.image_size}px)"
            if not progress or os.environ.get("RESUNETPP_LOG_EPOCHS"):
                log(msg)
    run.monitor.close()
    if state is not None and run.epoch == run.start_epoch:  # killed after the state, before history.json
        write_json_atomic(out / "history.json", run.history)
    return {"history": run.history, "best_val_dice": run.best, "epochs": run.epoch}


@torch.no_grad()
def validate(model, vi, vm, mean, std, cfg: TrainConfig, use_amp: bool, amp_dtype, monitor: RangeMonitor
             ) -> tuple[float, dict[str, list[float]]]:
    """Mean per-image Dice at the training resolution, plus per-image |max| of the monitored maps."""
    model.eval()
    dices: list[float] = []
    amax: dict[str, list[float]] = {}
    for s in range(0, len(vi), cfg.batch_size):
        img = (vi[s:s + cfg.batch_size].float() / 255.0 - mean) / std
        if cfg.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=img.device.type, dtype=amp_dtype, enabled=use_amp):
            logits = model(img)
        dices += _batch_dice(logits.float(), vm[s:s + cfg.batch_size], cfg.num_classes)
        for k, v in monitor.per_image_amax().items():
            amax.setdefault(k, []).extend(v)
    return float(np.mean(dices)), amax
