"""The experiments behind benchmarks/INT8.md, as one script over the library (no private copies).

Every score is against the *original* FP32 model's logits, per image at the network's input size:

* **logit error** -- RMS difference of the logits clipped to probabilities in [1e-3, 1 - 1e-3]
  (a pixel both models are sure of costs nothing however far apart the raw logits are);
* **near-threshold error** -- RMS logit difference on the pixels the FP32 model puts at
  |logit| < 2, where a mask can flip;
* Dice of the binarised masks (threshold 0.5) vs the FP32 masks, mean / min / images < 0.90.

Subcommands (``python -m resunetpp.bench.int8_study --help``):

``leave-one-out``
    PyTorch simulation of the default INT8 recipe (``resunetpp.export.quantsim.QuantSim``: equalization, bias
    correction, percentile ranges, the default kept modules in float) on held-out *training*
    images -- a seeded sample outside the calibration set, never validation images -- then each
    remaining convolution back in float in turn, with its share of the FLOPs. Ranks what each
    float convolution buys per unit of work.
``simulate``
    The same simulation for one set of kept modules (bias correction redone for that set).
``artifacts``
    The written INT8 artifacts, run as :mod:`resunetpp.engines` engines (``*.onnx`` on ONNX Runtime's
    CPU provider, ``*.xml`` on OpenVINO with f32 float ops) on any split: what the product command's own numbers are made of.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from resunetpp.export.quantize import DEFAULT_BIAS_CORRECTION_IMAGES, DEFAULT_EQUALIZE_ALPHA, DEFAULT_INT8_KEEP_MODULES

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

DataOpt = Annotated[Path, typer.Option(exists=True, file_okay=False, help="Dataset root (images/, masks/, train.txt, val.txt).")]
CkptOpt = Annotated[Path, typer.Option(exists=True, dir_okay=False, help="FP32 checkpoint.")]
DEFAULT_CKPT = Path("resunetpp/weights/resunetpp_kvasir.safetensors")


#: logits of the probabilities 1e-3 and 1 - 1e-3: beyond them both models are equally sure
LOGIT_CLIP = float(np.log(999.0))


def clipped_logit(x: np.ndarray) -> np.ndarray:
    return np.clip(x.astype(np.float64), -LOGIT_CLIP, LOGIT_CLIP)


def score(logits: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Logit errors and mask Dice of ``logits`` against the FP32 ``reference`` logits, per image."""
    errs, near, dices = [], [], []
    for a, r in zip(logits, reference, strict=True):
        errs.append(float(np.sqrt(np.mean((clipped_logit(a) - clipped_logit(r)) ** 2))))
        m = np.abs(r) < 2
        near.append(float(np.sqrt(np.mean((a[m] - r[m]) ** 2))) if m.any() else 0.0)
        x, y = a > 0, r > 0
        s = int(x.sum() + y.sum())
        dices.append(1.0 if s == 0 else 2.0 * float((x & y).sum()) / s)
    d = np.asarray(dices)
    return {"logit_error": float(np.mean(errs)), "near_threshold_error": float(np.mean(near)),
            "dice_mean": float(d.mean()), "dice_min": float(d.min()), "below_0.90": int((d < 0.9).sum()),
            "dices": dices}


def line(label: str, s: dict) -> str:
    return (f"{label:44s} logit err {s['logit_error']:.4f}  near-threshold {s['near_threshold_error']:.4f}  "
            f"Dice mean {s['dice_mean']:.4f} min {s['dice_min']:.4f} <0.90: {s['below_0.90']}")


class Study:
    """Calibration images, held-out training images, and the FP32 reference logits on them."""

    def __init__(self, data: Path, checkpoint: Path, calib_count: int, heldout: int, seed: int) -> None:
        import torch

        from resunetpp.export.calibration import check_disjoint, select_images
        from resunetpp.checkpoint import load_checkpoint
        from resunetpp.flops import count_flops

        torch.set_grad_enabled(False)
        self.ckpt = load_checkpoint(checkpoint)
        pre = self.ckpt.preprocessing
        calib = select_images(data, None, calib_count)  # the export's own calibration sample
        self.calib = [x[None] for x in calib.inputs(pre)]
        train = [s.strip() for s in (data / "train.txt").read_text().splitlines() if s.strip()]
        rest = sorted(set(train) - set(calib.stems))
        if heldout > len(rest):
            raise typer.BadParameter(f"only {len(rest)} training images outside the calibration set")
        pick = sorted(random.Random(seed).sample(rest, heldout))
        self.heldout_stems = pick
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(pick) + "\n")
        try:
            held = select_images(data, f.name, None, role="evaluation")
        finally:
            Path(f.name).unlink()
        check_disjoint(calib, held)
        self.heldout = [x[None] for x in held.inputs(pre)]
        fp32 = self.ckpt.build_model().eval()
        self.reference = self.logits(fp32, self.heldout)
        self.flops = count_flops(fp32, tuple(self.calib[0].shape[1:]))

    @staticmethod
    def logits(model, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        return [model(torch.as_tensor(x)).numpy() for x in images]

    def prepared(self, keep: tuple[str, ...], alpha: float | None, bc_images: int):
        """The default recipe's INT8 simulation with ``keep`` in float: (model, sim, ranges)."""
        import torch

        from resunetpp.export.bias_correction import bias_correct
        from resunetpp.export.equalize import equalize
        from resunetpp.export.quantsim import QuantSim

        m = self.ckpt.build_model().eval()
        if alpha is not None:
            equalize(m, self.calib, alpha)
        if bc_images:
            bias_correct(m, self.calib, bc_images, keep_modules=keep)
        m.eval()
        sim = QuantSim(m, keep)
        sim.observe(len(self.calib))
        for x in self.calib:
            m(torch.as_tensor(x))
        return m, sim, dict(sim.freeze())


@app.command("leave-one-out")
def leave_one_out(
    data: DataOpt, out: Annotated[Path, typer.Option(help="JSON results.")],
    checkpoint: CkptOpt = DEFAULT_CKPT,
    calib_count: int = 100, heldout: int = 160, seed: int = 7,
    keep_float: Annotated[Optional[list[str]], typer.Option(help="Kept in float throughout (default: the export's default).")] = None,
) -> None:
    """Each convolution of the default INT8 simulation back in float, one at a time."""
    t0 = time.time()
    keep = tuple(keep_float) if keep_float is not None else DEFAULT_INT8_KEEP_MODULES
    st = Study(data, checkpoint, calib_count, heldout, seed)
    flops = st.flops
    m, sim, amax = st.prepared(keep, DEFAULT_EQUALIZE_ALPHA, DEFAULT_BIAS_CORRECTION_IMAGES)
    fq = dict(zip(sim.convs, sim.weight_fq))
    res = {"keep_float": list(keep), "heldout": st.heldout_stems, "gflop": flops.total / 1e9}
    res["base"] = s = score(st.logits(m, st.heldout), st.reference)
    print(line("default recipe", s), f"{time.time() - t0:.0f}s", flush=True)
    res["convs"] = {}
    for name in sim.convs:  # float = no input fake-quant, no weight fake-quant
        key = name + ":in"
        sim.amax.pop(key)
        fq[name].enabled = False
        s = score(st.logits(m, st.heldout), st.reference)
        sim.amax[key] = amax[key]
        fq[name].enabled = True
        s["flops_share"] = flops.share([name])
        res["convs"][name] = s
        print(line(f"{name} ({100 * s['flops_share']:.1f}%)", s), flush=True)
        out.write_text(json.dumps(res, indent=1))
    base = res["base"]["near_threshold_error"]
    ranked = sorted(res["convs"].items(), key=lambda kv: -(base - kv[1]["near_threshold_error"]) / kv[1]["flops_share"])
    print("\nnear-threshold error cut per % of the FLOPs:")
    for name, s in ranked[:12]:
        cut = base - s["near_threshold_error"]
        print(f"  {name:40s} {100 * s['flops_share']:5.1f}%  cut {cut:+.4f}  per % {cut / (100 * s['flops_share']):+.4f}")


@app.command()
def simulate(
    data: DataOpt, checkpoint: CkptOpt = DEFAULT_CKPT,
    calib_count: int = 100, heldout: int = 160, seed: int = 7,
    keep_set: Annotated[Optional[list[str]], typer.Option(help="Comma-separated modules kept in float (repeatable: one simulation each; 'none': every convolution INT8). Default: the export's default.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON results.")] = None,
) -> None:
    """The default INT8 simulation with given modules in float (bias correction redone for each set)."""
    sets = [DEFAULT_INT8_KEEP_MODULES] if not keep_set else [
        tuple(k.strip() for k in ks.split(",") if k.strip() and k.strip().lower() != "none") for ks in keep_set]
    st = Study(data, checkpoint, calib_count, heldout, seed)
    res = []
    for keep in sets:
        m, _sim, _ = st.prepared(keep, DEFAULT_EQUALIZE_ALPHA, DEFAULT_BIAS_CORRECTION_IMAGES)
        s = score(st.logits(m, st.heldout), st.reference)
        s.update(keep_float=list(keep), flops_share=st.flops.share(keep))
        res.append(s)
        print(line(f"{len(keep)} modules in float, {100 * s['flops_share']:.1f}% of the FLOPs", s), flush=True)
        if out is not None:
            out.write_text(json.dumps({"heldout": st.heldout_stems, "runs": res}, indent=1))


@app.command()
def artifacts(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="INT8 Q/DQ .onnx or OpenVINO .xml files.")],
    data: DataOpt, checkpoint: CkptOpt = DEFAULT_CKPT,
    split: Annotated[str, typer.Option(help="Split name or file of --data.")] = "val",
) -> None:
    """Written artifacts against the FP32 model on a split."""
    import torch

    from resunetpp.export.calibration import select_images
    from resunetpp.export.verify import artifact_predict
    from resunetpp.checkpoint import load_checkpoint

    torch.set_grad_enabled(False)
    ckpt = load_checkpoint(checkpoint)
    ims = select_images(data, split, None, role="evaluation", default_split="val")
    x = [a[None] for a in ims.inputs(ckpt.preprocessing)]
    ref = Study.logits(ckpt.build_model().eval(), x)
    for f in files:  # as the export verifies them: ONNX Runtime's CPU provider, OpenVINO's CPU with the hint
        onnx = f.suffix == ".onnx"  # the IR's record names (the engine's default)
        with artifact_predict(f, "onnxruntime" if onnx else "openvino") as run:
            probs = [run(a) for a in x]
        lg = [np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1)) for p in probs]
        s = score(lg, ref)
        worst = sorted(zip(s["dices"], ims.stems))[:3]
        print(line(str(f), s), "worst", ", ".join(f"{n[:8]} {d:.3f}" for d, n in worst), flush=True)


if __name__ == "__main__":
    app()
