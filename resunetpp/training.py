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

from resunetpp.atomic import atomic_path, write_json_atomic
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
    from resunetpp.model import SIZE_MULTIPLE

    problems = []
    for name in ("epochs", "batch_size", "num_classes", "val_every", "workers"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if cfg.image_size < SIZE_MULTIPLE or cfg.image_size % SIZE_MULTIPLE:
        problems.append(f"image_size must be a positive multiple of {SIZE_MULTIPLE}, got {cfg.image_size}")
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


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train and return the history. Writes ``last.safetensors``, ``best.safetensors``,
    ``train_state.pt`` and ``history.json`` into ``cfg.out`` (all atomically)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    check_train_config(cfg, resume)
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    state = None
    state_path = out / STATE_FILE
    if resume:
        if not state_path.is_file():
            raise ResUNetError(f"{state_path}: nothing to resume (no training state in --out)")
        state = _load_state(state_path)
        saved = json.loads(state["train_config"])
        for k in ("epochs", "time_budget_s", "device", "workers", "out"):
            saved[k] = getattr(cfg, k)  # these may change on resume
        saved["filters"] = tuple(saved["filters"])
        cfg = TrainConfig(**saved)

    mcfg = ModelConfig(in_channels=3, num_classes=cfg.num_classes, filters=tuple(cfg.filters),
                       bridge=cfg.bridge, architecture=cfg.architecture)
    pre = Preprocessing(size=(cfg.image_size, cfg.image_size))
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
    mean = torch.tensor(pre.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, -1, 1, 1)

    model = ResUNetPlusPlus(mcfg)
    lineage = None
    if state is not None and "lineage" in state:
        lineage = json.loads(state["lineage"])
    elif cfg.init_from:
        from resunetpp.checkpoint import lineage as lineage_of, load_checkpoint, load_state_dict_checked

        init = load_checkpoint(cfg.init_from, verify=False)
        if init.config != mcfg:
            raise ResUNetError(f"{cfg.init_from}: --init-from holds another architecture ({init.config}) "
                               f"than the one asked for ({mcfg})")
        load_state_dict_checked(model, init.state_dict, cfg.init_from)
        # Where the starting weights came from, kept in every checkpoint of this run: the chain of
        # runs that made a fine-tuned model stays readable even after the init file is replaced.
        lineage = lineage_of(cfg.init_from, init)
        log(f"initialised from {cfg.init_from}")
    model = model.to(device)
    channels_last = use_channels_last(cfg, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = (cfg.amp and device.type == "cuda") or (cfg.cpu_bf16 and device.type == "cpu")
    amp_dtype = torch.bfloat16
    monitor = RangeMonitor(model)
    gen = torch.Generator().manual_seed(cfg.seed)

    steps_per_epoch = max(1, len(train_ds) // cfg.batch_size)
    total_epochs = cfg.epochs
    start_epoch = 0
    history: list[dict] = []
    best = -1.0
    elapsed_before = 0.0
    if state is not None:
        from resunetpp.checkpoint import load_checkpoint, load_state_dict_checked

        if isinstance(state.get("model"), dict):  # the weights saved with this state: same epoch for sure
            load_state_dict_checked(model, {k: v.float() if v.is_floating_point() else v
                                            for k, v in state["model"].items()}, state_path)
        else:  # a state written before the weights were kept in it
            last = load_checkpoint(out / "last.safetensors", verify=False)
            load_state_dict_checked(model, last.state_dict, out / "last.safetensors")
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        total_epochs = int(state["total_epochs"]) if cfg.time_budget_s else cfg.epochs
        history = json.loads(state["history"])
        best = float(state["best"])
        elapsed_before = float(state["elapsed_s"])
        gen.set_state(state["generator"])
        log(f"resuming after epoch {start_epoch} of {total_epochs}")

    def make_ckpt(epoch: int, val_dice: float | None) -> Checkpoint:
        prov = {
            "trained_with": "resunetpp train",
            "train_config": {k: v for k, v in asdict(cfg).items() if k != "workers"},
            "epochs_completed": epoch,
            "val_dice_train_resolution": val_dice,
            "train_images": len(train_ds),
            "elapsed_s": round(elapsed_before + time.time() - t_start, 1),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "parameters": count_parameters(model),
        }
        if lineage is not None:
            prov["lineage"] = lineage
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return Checkpoint(mcfg, sd, pre, list(cfg.class_names), prov)

    t_start = time.time()
    epoch = start_epoch
    cols = [TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[total_epochs]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val Dice {task.fields[vdice]}"), TimeElapsedColumn()]
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=steps_per_epoch, epoch=epoch, total_epochs=total_epochs,
                            loss=float("nan"), vdice="-")
        while epoch < total_epochs:
            model.train()
            perm = torch.randperm(len(train_ds), generator=gen)
            ep_t = time.time()
            losses, regs = [], []
            bar.reset(task, total=steps_per_epoch)
            bar.update(task, epoch=epoch + 1)
            for it in range(steps_per_epoch):
                step = epoch * steps_per_epoch + it
                lr = _lr_at(step, total_epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, cfg.lr)
                for gparam in opt.param_groups:
                    gparam["lr"] = lr
                idx = perm[it * cfg.batch_size:(it + 1) * cfg.batch_size].to(device)
                img = xi[idx].float() / 255.0
                if cfg.num_classes == 1:
                    msk = xm[idx].float()[:, None]
                else:
                    msk = F.one_hot(xm[idx].long(), cfg.num_classes).permute(0, 3, 1, 2).float()
                img, msk = augment(img, msk, gen)
                target = (msk[:, 0] > 0.5).float() if cfg.num_classes == 1 else msk.argmax(1)
                img = ((img - mean) / std)
                if channels_last:
                    img = img.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = model(img)
                loss = segmentation_loss(logits.float(), target, cfg.num_classes)
                if cfg.range_reg > 0:
                    reg = monitor.penalty(cfg.range_tau)
                    regs.append(reg.detach())
                    loss = loss + cfg.range_reg * reg
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {it}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                losses.append(loss.detach())
                if progress and (it % 5 == 0 or it == steps_per_epoch - 1):
                    bar.update(task, completed=it + 1, loss=float(losses[-1]))
            epoch += 1
            ep_time = time.time() - ep_t
            row = {"epoch": epoch, "loss": float(torch.stack(losses).mean()), "lr": lr, "time_s": round(ep_time, 2)}
            if regs:
                row["range_penalty"] = float(torch.stack(regs).mean())
            # Size the run from the *second* epoch: the first carries the warm-up (cuDNN autotuning,
            # allocator growth) and ran ~5x slower than the rest on an H200, which cut a 440 s
            # budget to 21 epochs. Warm-up LR steps (warmup_epochs >= 2) do not depend on the total.
            if cfg.time_budget_s and epoch == start_epoch + 2 and state is None:
                fit = int((cfg.time_budget_s - (time.time() - t0)) / max(ep_time, 1e-3))
                total_epochs = max(epoch, min(cfg.epochs, epoch + fit))
                bar.update(task, total_epochs=total_epochs)
                log(f"time budget {cfg.time_budget_s:.0f}s: training {total_epochs} epochs ({ep_time:.1f}s each)")
            vd = None
            if vi is not None and (epoch % cfg.val_every == 0 or epoch == total_epochs):
                vd, amax = validate(model, vi, vm, mean, std, cfg, use_amp, amp_dtype, monitor)
                row["val_dice"] = vd
                row["amax_p50"] = {k: float(np.median(v)) for k, v in amax.items()}
                row["amax_max"] = {k: float(np.max(v)) for k, v in amax.items()}
                bar.update(task, vdice=f"{vd:.4f}")
            history.append(row)
            ck = make_ckpt(epoch, vd)
            save_checkpoint(ck, out / "last.safetensors")
            if vd is not None and vd > best:
                best = vd
                save_checkpoint(ck, out / "best.safetensors")
            with atomic_path(state_path) as tmp:
                # The weights travel with the optimizer state and epoch count: a kill between this
                # epoch's writes may leave last.safetensors an epoch ahead; resume starts from these.
                torch.save({"model": ck.state_dict, "optimizer": opt.state_dict(), "epoch": epoch,
                            "total_epochs": total_epochs,
                            "history": json.dumps(history), "best": best, "generator": gen.get_state(),
                            "elapsed_s": elapsed_before + time.time() - t_start,
                            "train_config": json.dumps(asdict(cfg)),
                            "lineage": json.dumps(lineage)}, tmp)
            write_json_atomic(out / "history.json", history)
            msg = f"epoch {epoch}/{total_epochs} loss {row['loss']:.4f} lr {lr:.2e} {ep_time:.1f}s"
            if vd is not None:
                msg += f" val Dice {vd:.4f} (at {cfg.image_size}px)"
            if not progress or os.environ.get("RESUNETPP_LOG_EPOCHS"):
                log(msg)
    monitor.close()
    if state is not None and epoch == start_epoch:  # killed after the state, before history.json
        write_json_atomic(out / "history.json", history)
    return {"history": history, "best_val_dice": best, "epochs": epoch}


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
