"""benchmarks/shift_study.py: each photometric shift does what its name says, and the study's
report has every field (tiny model, synthetic images)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from resunetpp.bench import shift_study as ss
from tests.conftest import make_dataset, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("torch_threads")


def _image(seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    smooth = 100 + 60 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]
    return np.clip(smooth + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)


def _high_frequency(image: np.ndarray) -> float:
    x = image.astype(np.float64).mean(axis=2)
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float((lap ** 2).mean())


def test_each_shift_does_what_it_says():
    im = _image()
    for name, strength in ss.SHIFTS:
        out = ss.SHIFT_FUNCTIONS[name](im, strength)
        assert out.shape == im.shape and out.dtype == np.uint8, name
    assert ss.brightness(im, 40).mean() > im.mean() + 35 and ss.brightness(im, -40).mean() < im.mean() - 35
    assert ss.brightness(np.full((4, 4, 3), 250, np.uint8), 40).max() == 255  # clipped, not wrapped
    assert ss.contrast(im, 1.5).std() > 1.3 * im.std() and ss.contrast(im, 0.6).std() < 0.7 * im.std()
    assert abs(float(ss.contrast(im, 0.6).mean()) - float(im.mean())) < 1.0
    warm, cool = ss.colour_temperature(im, 0.15), ss.colour_temperature(im, -0.15)
    assert warm[..., 0].mean() > im[..., 0].mean() > cool[..., 0].mean()
    assert warm[..., 2].mean() < im[..., 2].mean() < cool[..., 2].mean()
    assert np.array_equal(warm[..., 1], im[..., 1])
    hf = _high_frequency(im)
    assert _high_frequency(ss.blur(im, 1.5)) < 0.5 * hf
    assert _high_frequency(ss.blur(im, 4.0)) < _high_frequency(ss.blur(im, 1.5))
    assert _high_frequency(ss.resolution(im, 0.25)) < _high_frequency(ss.resolution(im, 0.5)) < hf
    # JPEG: the pixels (bytes) change, the size does not; lower quality moves them more
    q50, q15 = ss.jpeg(im, 50), ss.jpeg(im, 15)
    assert not np.array_equal(q50, im)
    err50 = np.abs(q50.astype(int) - im).mean()
    assert 0 < err50 < np.abs(q15.astype(int) - im).mean()
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    assert ss.jpeg(im, 95).shape == im.shape


def test_worst_case_names_the_condition_and_image():
    rows = [{"condition": "a", "dice_min": 0.9, "disagreement_image_share_max": 0.01,
             "worst_image": {"image": "x"}, "most_disagreeing_image": {"image": "y"}},
            {"condition": "b", "dice_min": 0.5, "disagreement_image_share_max": 0.002,
             "worst_image": {"image": "z"}, "most_disagreeing_image": {"image": "w"}}]
    w = ss.worst_case(rows)
    assert w["by_dice_min"] == {"condition": "b", "dice_min": 0.5, "image": "z"}
    assert w["by_disagreement"] == {"condition": "a", "disagreement_image_share_max": 0.01, "image": "y"}


def test_shift_study_report_has_every_field(tmp_path):
    data = make_dataset(tmp_path / "d", 10, 32, splits={"train": list(range(7)), "val": [7, 8, 9]})
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "shift.json"
    res = CliRunner().invoke(ss.app, ["shifts", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(out),
                                      "--calib-count", "4", "--shift", "brightness=40", "--shift", "jpeg=20",
                                      "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert [r["condition"] for r in report["shifts"]] == ["none", "brightness +40", "jpeg 20"]
    assert report["images"] == 3 and "simulation" in report["int8"]
    for row in report["shifts"] + report["calibration_sets"]:
        assert set(ss.ROW_FIELDS) <= set(row), set(ss.ROW_FIELDS) - set(row)
        assert 0.0 <= row["dice_min"] <= row["dice_mean"] <= 1.0 and row["images"] == 3
        assert 0.0 <= row["disagreement_image_share_max"] <= 1.0
    assert report["shifts"][1]["shift"] == {"name": "brightness", "strength": 40.0}
    labels = [r["condition"] for r in report["calibration_sets"]]
    assert any(lab.startswith("seed 1") for lab in labels) and any(lab.startswith("darkest") for lab in labels)
    assert set(report["worst_shift"]) == {"by_dice_min", "by_disagreement"}
    assert report["worst_shift"]["by_dice_min"]["condition"] in {"none", "brightness +40", "jpeg 20"}
    assert "worst_calibration_set" in report
    assert list((tmp_path / "cache").glob("fp32_*.npy"))  # reference outputs cached
    for row in report["shifts"]:  # each worst image comes with FP32's own noise on it
        for key in ("worst_image", "most_disagreeing_image"):
            noise = row[key]["fp32_noise"]
            assert set(noise["fp32_vs_itself"]) == {ss.shift_label(*c) for c in ss.IMPERCEPTIBLE}
            for v in noise["fp32_vs_itself"].values():
                assert 0.0 <= v["dice_vs_reference"] <= 1.0 and 0.0 <= v["disagreement_image_share"] <= 1.0
            assert 0.0 <= noise["fp32_unsure_image_share"] <= 1.0
    bad = CliRunner().invoke(ss.app, ["shifts", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(out),
                                      "--shift", "sepia=1", "--no-calib-variants"])
    assert bad.exit_code != 0 and "sepia" in bad.output


def test_calib_count_report_records_ranges_per_image(tmp_path):
    data = make_dataset(tmp_path / "d", 10, 32, splits={"train": list(range(7)), "val": [7, 8, 9]})
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "cc.json"
    res = CliRunner().invoke(ss.app, ["calib-count", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(out),
                                      "--count", "2", "--count", "5", "--estimator", "percentile",
                                      "--estimator", "max_of_percentiles", "--estimator", "percentile+flips"])
    assert res.exit_code == 0, res.output
    runs = json.loads(out.read_text())["runs"]
    assert [(r["calibration_images"], r["estimator"]) for r in runs] == [
        (2, "percentile"), (2, "max_of_percentiles"), (2, "percentile+flips"),
        (5, "percentile"), (5, "max_of_percentiles"), (5, "percentile+flips")]
    for r in runs:
        assert set(ss.ROW_FIELDS) <= set(r) and len(r["dice_per_image"]) == 3
        stats = r["calibration_ranges"]
        assert set(stats["max"]) == set(r["amax"])
        per_image = 2 * r["calibration_images"] if r["estimator"].endswith("+flips") else r["calibration_images"]
        assert all(len(v) == per_image for v in stats["max"].values())
        assert all(m >= p for k in stats["max"] for m, p in zip(stats["max"][k], stats["p99.99"][k]))
    # the estimator really set the ranges: the largest per-image percentile
    r = runs[1]
    assert all(r["amax"][k] == pytest.approx(max(r["calibration_ranges"]["p99.99"][k])) for k in r["amax"])


def test_simulation_widens_small_sets_as_the_export_does(tmp_path):
    from resunetpp.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "tiny.safetensors"))
    rng = np.random.default_rng(0)
    images = [rng.normal(0, 1, (3, 32, 32)).astype(np.float32) * s for s in (0.5, 1.0, 3.0)]
    _, pooled, stats = ss.simulated_int8(ckpt, images, small_set_rule=False)
    _, widened, _ = ss.simulated_int8(ckpt, images)
    assert set(pooled.amax) == set(widened.amax)
    for k, a in pooled.amax.items():
        assert widened.amax[k] == pytest.approx(max(a, max(stats.p9999[k])), rel=1e-6)
    assert any(widened.amax[k] > pooled.amax[k] for k in pooled.amax)


@pytest.mark.slow
def test_calib_sets_exports_real_artifacts_for_each_set(tmp_path):
    """One real default export per calibration set (the export's own sample, another seed, the darkest
    images, ...): both INT8 artifacts verified on the same held-out images, each set its own images."""
    data = make_dataset(tmp_path / "d", 10, 32, splits={"train": list(range(7)), "val": [7, 8, 9]})
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "sets.json"
    args = ["calib-sets", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(out),
            "--work", str(tmp_path / "w"), "--calib-count", "4", "--eval-count", "3"]
    res = CliRunner().invoke(ss.app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    labels = [r["condition"] for r in report["sets"]]
    assert labels[0].startswith("the export's own sample") and any(lab.startswith("seed 1") for lab in labels)
    assert any(lab.startswith("darkest") for lab in labels)
    for i, row in enumerate(report["sets"]):  # each export calibrated on its own set
        record = json.loads((tmp_path / "w" / f"set{i}" / "model_int8_qdq.onnx.json").read_text())["artifact"]
        assert record["calibration"]["sha256"] == row["calibration"]["sha256"]
        assert record["calibration"]["count"] == row["calibration"]["count"] == 4
        assert {a["artifact"] for a in row["artifacts"]} == {"onnx int8", "openvino int8"}
        for a in row["artifacts"]:
            assert 0.0 <= a["dice_vs_reference_min"] <= a["dice_vs_reference_mean"] <= 1.0
            assert isinstance(a["gate_passed"], bool) and a["worst_images"]
    first = tmp_path / "w" / "set0" / "model_int8_qdq.onnx"
    assert first.is_file()
    # run again: every set is already measured on the same images, nothing is exported again
    stamp = first.stat().st_mtime_ns
    again = CliRunner().invoke(ss.app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("already in") == len(report["sets"]), again.output
    assert json.loads(out.read_text()) == report and first.stat().st_mtime_ns == stamp


def test_resume_refuses_a_results_file_it_cannot_trust(tmp_path):
    """calib-sets / calib-count resume from their own JSON: every field they read is checked first, and a
    file that is not theirs is one line naming it and the field, not a KeyError halfway through."""
    import typer

    out = tmp_path / "runs.json"
    fields = {"calibration_images": int, "estimator": str}
    good = {"runs": [{"calibration_images": 64, "estimator": "percentile", "extra": 1}]}
    out.write_text(json.dumps(good))
    assert ss._resume(out, "runs", fields) == good
    for text, problem in [("{", "JSONDecodeError"), ('{"runs": 3}', "no list 'runs'"),
                          ('{"runs": [7]}', "runs[0] is not an object"),
                          ('{"runs": [{"calibration_images": "64", "estimator": "p"}]}',
                           "runs[0].calibration_images must be int, got '64'"),
                          ('{"runs": [{"calibration_images": true, "estimator": "p"}]}', "must be int, got True"),
                          ('{"runs": [{"calibration_images": 64}]}', "runs[0].estimator must be str, got None")]:
        out.write_text(text)
        with pytest.raises(typer.BadParameter, match=re.escape(problem)) as err:
            ss._resume(out, "runs", fields)
        assert str(out) in str(err.value) and "\n" not in str(err.value)
    out.write_text('{"sets": [{"condition": "seed 1", "artifacts": [], "calibration": {"sha256": "ab"}}]}')
    with pytest.raises(typer.BadParameter, match=re.escape("sets[0].calibration.count must be int")):
        ss._resume(out, "sets", {"condition": str, "artifacts": list}, {"calibration": {"sha256": str, "count": int}})


def test_fp32_noise_says_where_fp32_was_unsure(tmp_path):
    from resunetpp.checkpoint import load_checkpoint

    data = make_dataset(tmp_path / "d", 10, 32, splits={"train": list(range(7)), "val": [7, 8, 9]})
    val = ss.Val(data, load_checkpoint(tiny_checkpoint(tmp_path / "tiny.safetensors")), None)
    h, w = val.inputs(None)[0].shape[1:]
    fp32 = np.full((1, h, w), 0.95, np.float32)
    fp32[:, :4] = 0.45  # an unsure band
    unsure_flip = fp32.copy()
    unsure_flip[:, :4] = 0.55  # INT8 flips only the unsure band
    sure_flip = fp32.copy()
    sure_flip[:, -4:] = 0.05  # INT8 flips pixels FP32 was sure of
    noise = ss.fp32_noise(val, val.images[0], 0, unsure_flip, fp32)
    assert noise["differing_pixels_fp32_unsure"] == 1.0
    assert noise["fp32_unsure_image_share"] == pytest.approx(4 / h)
    assert ss.fp32_noise(val, val.images[0], 0, sure_flip, fp32)["differing_pixels_fp32_unsure"] == 0.0
    assert ss.fp32_noise(val, val.images[0], 0, fp32, fp32)["differing_pixels_fp32_unsure"] is None


def test_calib_folder_shifts_every_second_image_of_the_export_sample(tmp_path):
    from resunetpp.export import calibration as cal
    from resunetpp.imageio import read_image

    data = make_dataset(tmp_path / "d", 10, 32, splits={"train": list(range(7)), "val": [7, 8, 9]})
    out = tmp_path / "calib"
    res = CliRunner().invoke(ss.app, ["calib-folder", "--data", str(data), "--out", str(out), "--shift", "brightness=-40",
                                      "--calib-count", "5"])
    assert res.exit_code == 0, res.output
    sample = cal.select_images(data, None, 5, role="calibration", default_split="train")
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 5 and sum(f.endswith("_shifted.png") for f in files) == 2
    for i, (stem, path) in enumerate(zip(sample.stems, sample.paths)):
        shifted = i % 2 == 1
        written = read_image(out / f"{stem}{'_shifted' if shifted else ''}.png", 3)
        original = read_image(path, 3)
        assert written.shape == original.shape
        assert np.array_equal(written, ss.brightness(original, -40) if shifted else original)
    again = CliRunner().invoke(ss.app, ["calib-folder", "--data", str(data), "--out", str(out), "--shift", "blur=4"])
    assert again.exit_code != 0 and "exists" in again.output
    bad = CliRunner().invoke(ss.app, ["calib-folder", "--data", str(data), "--out", str(tmp_path / "x"), "--shift", "sepia"])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
