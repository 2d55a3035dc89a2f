"""Quantization-aware fine-tuning (export/qat.py), the INT8 reference option of the export, and
`resunetpp quantize --qat-epochs` on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from resunetpp.cli import app
from resunetpp.export.calibration import synthetic_images
from resunetpp.export.pipeline import ExportOptions, run_export
from resunetpp.export.qat import QATOptions, distillation_loss, mask_dice_loss, qat_finetune
from resunetpp.export.quantsim import QuantSim, _AbsHistogram, _TopK, sim_ranges
from resunetpp.export.ranges import mse_range
from resunetpp.export.quantize import NNCFRecipe, QDQRecipe
from resunetpp.checkpoint import Checkpoint, file_sha256, load_checkpoint, save_checkpoint
from resunetpp.errors import ResUNetError
from resunetpp.model import ModelConfig, ResUNetPlusPlus
from resunetpp.preprocess import Preprocessing

TINY = ModelConfig(filters=(8, 8, 16, 16), bridge=16)
PRE = Preprocessing(size=(32, 32))


def _confident(seed: int = 0, gain: float = 40.0) -> ResUNetPlusPlus:
    """A tiny random model with large logits, so that INT8 noise visibly moves its probabilities."""
    torch.manual_seed(seed)
    model = ResUNetPlusPlus(TINY).eval()
    with torch.no_grad():
        model.head.weight.mul_(gain)
    return model


def _inputs(n: int, seed: int) -> list[np.ndarray]:
    return [PRE.apply(im) for im in synthetic_images(PRE, count=n, seed=seed)]


def test_streaming_percentile_is_exact() -> None:
    data = torch.randn(10, 7, 50)
    for pct in (99.0, 99.99, 100.0):
        t = _TopK(pct, images=10)
        for chunk in data.split(3):  # uneven batches
            t.update(chunk)
        assert t.value() == pytest.approx(float(np.percentile(data.abs().numpy(), pct, method="higher")))


def test_streaming_histogram_gives_the_mse_range_of_all_values() -> None:
    rng = np.random.default_rng(0)
    chunks = [np.zeros(1000), rng.laplace(0, 1, 50_000), rng.laplace(0, 3, 50_000)]  # zeros first, then wider
    h = _AbsHistogram()
    for c in chunks:
        h.update(torch.from_numpy(c))
    x = np.abs(np.concatenate(chunks))
    assert h.hist.sum() == x.size and h.largest == pytest.approx(x.max())
    assert h.value() == pytest.approx(mse_range(*np.histogram(x, bins=4096), x.max()), rel=0.03)
    empty = _AbsHistogram()
    empty.update(torch.zeros(10))
    assert empty.value() == 0.0
    with pytest.raises(ResUNetError, match="no calibration data"):
        _AbsHistogram().value()


def test_simulated_ranges_follow_the_export_method() -> None:
    model = _confident()
    x = torch.from_numpy(np.stack(_inputs(2, 1)))
    ranges = {}
    for method in ("percentile", "mse", "minmax"):
        sim = QuantSim(model, **sim_ranges(method, 99.0))
        sim.observe(images=2)
        with torch.no_grad():
            model(x)
        ranges[method] = sim.freeze()
        sim.remove()
    image = x.abs().numpy()
    key = "stem.body.0:in"  # reads the image
    assert ranges["minmax"][key] == pytest.approx(float(image.max()))
    assert ranges["percentile"][key] == pytest.approx(float(np.percentile(image, 99.0, method="higher")))
    assert ranges["mse"][key] == pytest.approx(mse_range(*np.histogram(image, bins=2048), image.max()), rel=0.03)
    assert ranges["mse"] != ranges["percentile"]
    with pytest.raises(ResUNetError, match="simulated range method"):
        QuantSim(model, method="entropy")


def test_fake_quant_sits_on_every_convolution_outside_the_kept_modules_and_comes_off() -> None:
    model = _confident()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.from_numpy(np.stack(_inputs(2, 1)))
    with torch.no_grad():
        ref = model(x)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    only_inputs = QuantSim(model)
    only_inputs.observe(images=2)
    with torch.no_grad():
        model(x)
    assert set(only_inputs.freeze()) == {f"{n}:in" for n in convs}  # default: inputs (and weights) only
    only_inputs.remove()
    sim = QuantSim(model, keep_modules=("head", "decoder1"), outputs=True)
    assert set(sim.convs) == {n for n in convs if n != "head" and not n.startswith("decoder1.")}
    sim.observe(images=2)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # observing changes nothing
    amax = sim.freeze()
    assert set(amax) == {f"{n}:{io}" for n in sim.convs for io in ("in", "out")}
    with torch.no_grad():
        quantized = model(x)
    assert not torch.equal(quantized, ref) and torch.isfinite(quantized).all()
    sim.remove()
    assert set(model.state_dict()) == set(plain)
    assert all(torch.equal(model.state_dict()[k], plain[k]) for k in plain)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    with pytest.raises(ResUNetError, match="'decoder9' .* is not in the model"):
        QuantSim(model, keep_modules=("decoder9",))


def test_distillation_loss_is_zero_only_when_the_student_agrees() -> None:
    t = torch.randn(2, 1, 8, 8) * 3
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(-t, t)) > 1.0
    t3 = torch.randn(2, 3, 8, 8) * 3
    assert float(distillation_loss(t3, t3)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(t3.flip(1), t3)) > 0.1


def test_mask_dice_loss_weighs_every_image_alike() -> None:
    teacher = torch.full((2, 1, 16, 16), -20.0)
    teacher[0, :, :8] = 20.0  # a large mask
    teacher[1, :, :2, :2] = 20.0  # a tiny one
    assert float(mask_dice_loss(teacher, teacher)) == pytest.approx(0.0, abs=2e-3)
    miss_large, miss_tiny = teacher.clone(), teacher.clone()
    miss_large[0, :, :2, :2] = -20.0  # the same 4 pixels lost on either image
    miss_tiny[1, :, :2, :2] = -20.0
    assert float(distillation_loss(miss_large, teacher)) == pytest.approx(float(distillation_loss(miss_tiny, teacher)))
    assert float(mask_dice_loss(miss_tiny, teacher)) > 10 * float(mask_dice_loss(miss_large, teacher))
    three = torch.randn(2, 3, 8, 8) * 4
    assert float(mask_dice_loss(three, three)) < float(mask_dice_loss(three.flip(1), three))


def test_qat_brings_the_quantized_model_closer_to_the_teacher_on_held_out_images() -> None:
    model = _confident()
    rng = np.random.default_rng(0)  # noise images: wide activations, so INT8 visibly moves the output
    images = [rng.standard_normal((3, 32, 32)).astype(np.float32) for _ in range(16)]
    student, record = qat_finetune(model, images[:12], images[12:],
                                   QATOptions(epochs=8, lr=1e-3, batch_size=4, percentile=90.0))  # clipping to fix
    assert record["quantized_convolutions"] == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert record["calibration_loss_after"] < 0.8 * record["calibration_loss_before"], record
    assert [h["epoch"] for h in record["history"]] == list(range(1, 9))
    # the student is a plain FP32 model again, and it did change
    assert not any("parametrizations" in k for k in student.state_dict())
    assert any(not torch.equal(student.state_dict()[k], model.state_dict()[k]) for k in model.state_dict())


@pytest.mark.parametrize("kw,message", [
    ({"epochs": 0}, "QAT epochs must be a positive integer"),
    ({"lr": 0.0}, "QAT learning rate must be positive"),
    ({"percentile": 0.0}, "percentile must be in"),
    ({"dice_weight": -1.0}, "Dice weight must be >= 0"),
    ({"method": "kl"}, "calibration method must be one of"),
])
def test_bad_qat_options_are_refused(kw, message) -> None:
    with pytest.raises(ResUNetError, match=message):
        QATOptions(**kw).check()


def _save(model: ResUNetPlusPlus, path: Path, config: ModelConfig = TINY) -> Path:
    return save_checkpoint(Checkpoint(config, {k: v.clone() for k, v in model.state_dict().items()}, PRE,
                                      ["polyp"] if config.num_classes == 1 else ["a", "b", "c"][:config.num_classes]),
                           path)


def _folder(root: Path, name: str, n: int, seed: int) -> Path:
    folder = root / name
    folder.mkdir()
    for i, im in enumerate(synthetic_images(PRE, count=n, seed=seed)):
        Image.fromarray(im).save(folder / f"{name}{i}.png")
    return folder


@pytest.mark.slow
def test_int8_artifacts_are_judged_against_the_reference_model(tmp_path: Path) -> None:
    a = _save(_confident(0), tmp_path / "a.safetensors")
    inverted = _confident(0)
    with torch.no_grad():
        inverted.head.weight.neg_()
        inverted.head.bias.neg_()
    b = _save(inverted, tmp_path / "b.safetensors")  # another model: the complement of a's masks
    calib, ev = _folder(tmp_path, "calib", 6, 2), _folder(tmp_path, "eval", 4, 3)
    keep = dict(keep_modules=())

    def dice(reference: Path | None, out: str) -> dict:
        report = run_export(ExportOptions(checkpoint=a, out=tmp_path / out, formats=("onnx",),
                                          precisions=("fp32", "int8"), calib=calib, eval=ev, allow_accuracy_drop=True,
                                          reference=reference, qdq=QDQRecipe(method="minmax", **keep),
                                          nncf=NNCFRecipe(**keep)))
        return {x.precision: x.metrics["dice_vs_reference_mean"] for x in report.artifacts}, report

    own, _ = dice(None, "own")
    other, report = dice(b, "other")
    assert other["fp32"] == pytest.approx(own["fp32"])  # FP32 is still compared with the checkpoint itself
    assert own["int8"] > 0.9 and other["int8"] < own["int8"] - 0.2, (own, other)
    assert report.verification["int8_reference"] == {"path": str(b), "sha256": file_sha256(b)}

    c = _save(ResUNetPlusPlus(ModelConfig(filters=(8, 8, 16, 16), bridge=16, num_classes=3)), tmp_path / "c.safetensors",
              ModelConfig(filters=(8, 8, 16, 16), bridge=16, num_classes=3))
    with pytest.raises(ResUNetError, match="the INT8 reference must take the same input and give the same output"):
        run_export(ExportOptions(checkpoint=a, out=tmp_path / "bad", formats=("onnx",), precisions=("int8",),
                                 calib=calib, eval=ev, reference=c))


@pytest.mark.slow
def test_quantize_qat_cli_writes_checkpoint_and_int8_artifacts(tmp_path: Path) -> None:
    ckpt = _save(_confident(0), tmp_path / "tiny.safetensors")
    calib, ev = _folder(tmp_path, "calib", 8, 2), _folder(tmp_path, "eval", 4, 3)
    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(ckpt), "--calib", str(calib), "--eval", str(ev), "--out",
                                      str(out), "--qat-epochs", "2", "--qat-lr", "1e-3", "--calib-count", "4", "--qat-dice-weight", "0.5",
                                      "--target-dice", "0.0", "--target-min-dice", "0.0"])
    assert result.exit_code == 0, result.output
    assert "goal" in result.output and " met" in result.output
    qat = load_checkpoint(out / "model_qat.safetensors")
    prov = qat.provenance
    assert prov["int8_reference"]["sha256"] == file_sha256(ckpt) == prov["lineage"]["init_sha256"]
    assert prov["qat"]["train_images"] == 8 and prov["qat"]["calibration_images"] == 4
    assert len(prov["qat"]["history"]) == 2
    assert prov["qat"]["options"]["dice_weight"] == 0.5 and prov["qat"]["options"]["outputs"] is False
    report = json.loads((out / "export_report.json").read_text())
    assert {(x["format"], x["precision"]) for x in report["artifacts"]} == {("onnx", "int8"), ("openvino", "int8")}
    assert report["verification"]["int8_reference"]["sha256"] == file_sha256(ckpt)
    assert (out / "model_int8_qdq.onnx").is_file() and (out / "openvino" / "model_int8.xml").is_file()
    onnx_int8 = next(x for x in report["artifacts"] if x["format"] == "onnx")
    qdq_recipe = json.loads((out / "model_int8_qdq.onnx.json").read_text())["artifact"]["quantization"]["recipe"]
    assert onnx_int8["written"] and qdq_recipe["quantize_outputs"] is prov["qat"]["options"]["outputs"]

    # an impossible goal: the artifacts are written, the exit code says the goal is not met
    strict = CliRunner().invoke(app, ["quantize", str(ckpt), "--calib", str(calib), "--eval", str(ev), "--out",
                                      str(tmp_path / "q2"), "--qat-epochs", "1", "--calib-count", "4",
                                      "--target-dice", "1.01"])
    assert strict.exit_code == 1 and "NOT met" in strict.output


def test_export_cli_int8_reference_option(tmp_path: Path) -> None:
    a = _save(_confident(0), tmp_path / "a.safetensors")
    three = ModelConfig(filters=(8, 8, 16, 16), bridge=16, num_classes=3)
    c = _save(ResUNetPlusPlus(three), tmp_path / "c.safetensors", three)
    calib, ev = _folder(tmp_path, "calib", 2, 2), _folder(tmp_path, "eval", 2, 3)
    result = CliRunner().invoke(app, ["export", str(a), "--out", str(tmp_path / "o"), "-f", "onnx", "-p", "int8",
                                      "--calib", str(calib), "--eval", str(ev), "--int8-reference", str(c)])
    assert result.exit_code == 1 and "the INT8 reference must take the same input" in result.output, result.output
    missing = CliRunner().invoke(app, ["export", str(a), "--out", str(tmp_path / "o"), "--int8-reference",
                                       str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 2
