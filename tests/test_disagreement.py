"""The mask-disagreement measure (resunetpp.metrics.disagreement), its place in the export's
accuracy report and INT8 gate, and the artifact record's checks of the accuracy fields."""

from __future__ import annotations

import numpy as np
import pytest

from resunetpp.artifact import accuracy_problem, record_problem
from resunetpp.export.options import ExportOptions
from resunetpp.export.verify import (INT8_MAX_DISAGREEMENT, INT8_MIN_IMAGE_DICE, compare_outputs, gate_for,
                                     int8_limits)
from resunetpp.errors import ResUNetError
from resunetpp.metrics import MIN_UNION_SHARE, dice, disagreement


def _blob(shape, y, x, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - y) ** 2 + (xx - x) ** 2 <= r * r).astype(np.uint8)


def test_issue_example_tiny_mask_plus_blob_is_a_small_share_of_the_frame():
    # the issue's frame: FP32 predicts 28 pixels, INT8 adds a 765-pixel blob elsewhere (0.7% of the frame)
    h, w = 330, 331
    fp32 = np.zeros((h, w), np.uint8)
    fp32[10:14, 10:17] = 1  # 28 pixels
    int8 = fp32.copy()
    blob = _blob((h, w), 200, 200, 15.6)
    int8[blob > 0] = 1
    added = int(blob.sum())
    assert 740 < added < 790
    d = disagreement(int8, fp32)
    assert d.pixels == added
    assert d.image_share == pytest.approx(added / (h * w)) and d.image_share < 0.008
    assert dice(int8, fp32) < 0.1  # Dice explodes
    # the union (28 + blob) is below the 1% floor: the floor is the denominator
    assert d.union_share == pytest.approx(added / (MIN_UNION_SHARE * h * w))


def test_union_share_is_one_minus_iou_for_lesion_sized_masks_and_bounded_for_tiny_ones():
    a = _blob((100, 100), 50, 50, 20)
    b = _blob((100, 100), 52, 50, 20)
    d = disagreement(a, b)
    inter, union = int((a & b).sum()), int((a | b).sum())
    assert union > MIN_UNION_SHARE * a.size
    assert d.union_share == pytest.approx(1 - inter / union)
    assert d.image_share == pytest.approx((union - inter) / a.size)
    # tiny: 2 pixels vs 0 pixels -- Dice says total failure, the shares stay tiny
    t = np.zeros((100, 100), np.uint8)
    t[0, :2] = 1
    e = disagreement(np.zeros_like(t), t)
    assert dice(np.zeros_like(t), t) == 0.0
    assert e.pixels == 2 and e.image_share == pytest.approx(2e-4) and e.union_share == pytest.approx(2 / 100)
    same = disagreement(a, a)
    assert same.pixels == 0 and same.image_share == 0.0 and same.union_share == 0.0
    empty = disagreement(np.zeros_like(t), np.zeros_like(t))
    assert empty.union_share == 0.0 and empty.image_share == 0.0
    # no floor: the plain 1 - IoU, which explodes like Dice
    assert disagreement(np.zeros_like(t), t, min_union_share=0.0).union_share == 1.0


def test_disagreement_multiclass_and_bad_input():
    a = np.array([[0, 1, 2, 2]])
    b = np.array([[0, 2, 2, 0]])
    d = disagreement(a, b, num_classes=3, min_union_share=0.0)
    assert d.pixels == 2 and d.image_share == 0.5 and d.union_share == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        disagreement(a, b[:, :3])
    with pytest.raises(ValueError, match="min_union_share"):
        disagreement(a, b, min_union_share=1.5)


def _probs(mask: np.ndarray) -> np.ndarray:
    return np.where(mask[None] > 0, 0.9, 0.1).astype(np.float32)


def test_compare_outputs_reports_the_shares_per_image_and_ranks_the_most_disagreeing():
    big = _blob((64, 64), 32, 32, 20)
    moved = _blob((64, 64), 34, 32, 20)
    tiny = np.zeros((64, 64), np.uint8)
    tiny[0, 0] = 1
    ref = [_probs(big), _probs(tiny), _probs(big)]
    out = [_probs(moved), _probs(np.zeros_like(tiny)), _probs(big)]
    m = compare_outputs(out, ref, names=["moved", "tiny", "same"])
    shares = m["disagreement_image_share_per_image"]
    assert shares[0] == pytest.approx(disagreement(moved, big).image_share, abs=1e-7)
    assert shares[1] == pytest.approx(1 / 64 ** 2, abs=1e-7) and shares[2] == 0.0
    assert m["disagreement_image_share_max"] == pytest.approx(max(shares), abs=1e-7)
    assert m["disagreement_image_share_mean"] == pytest.approx(np.mean(shares), abs=1e-7)
    assert m["disagreement_union_share_max"] == pytest.approx(disagreement(moved, big).union_share)
    assert m["min_union_share"] == MIN_UNION_SHARE
    assert m["most_disagreeing_images"][0]["image"] == "moved"
    assert m["worst_images"][0]["image"] == "tiny" and m["worst_images"][0]["dice_vs_reference"] == 0.0
    assert m["worst_images"][0]["disagreement_image_share"] == pytest.approx(1 / 64 ** 2)


def _metrics(dices, shares, mean=0.99):
    return {"images": len(dices), "nonfinite_images": 0, "dice_vs_reference_mean": mean,
            "dice_vs_reference_min": min(dices), "dice_vs_reference_per_image": dices,
            "disagreement_image_share_max": max(shares), "disagreement_image_share_per_image": shares,
            "dice_vs_gt_drop": None}


def test_int8_gate_refuses_a_large_disagreement_even_with_good_dice():
    ok = _metrics([0.99, 0.95], [0.001, INT8_MAX_DISAGREEMENT * 0.9])
    gate = gate_for("int8", ok)
    assert gate.passed and "at most" in gate.reason
    assert gate.as_dict()["limits"] == int8_limits()
    # Dice 0.95 on a large polyp that moved by 3% of the frame: the Dice floor passes it, the share does not
    bad = _metrics([0.99, 0.95, 0.96], [0.001, 0.03, 0.025])
    gate = gate_for("int8", bad)
    assert not gate.passed and gate.name == "int8-disagreement" and gate.value == 0.03
    assert "2 images" in gate.reason and "worst 3.00%" in gate.reason
    named = {**bad, "most_disagreeing_images": [{"image": "big", "dice_vs_reference": 0.95,
                                                 "disagreement_image_share": 0.03, "disagreement_union_share": 0.1}]}
    assert "(worst 3.00%, big: Dice 0.9500, 3.00% of its pixels differ)" in gate_for("int8", named).reason
    assert gate_for("int8", bad, max_disagreement=0.05).passed  # the option
    assert gate_for("int8", bad, max_disagreement=0.05).as_dict()["limits"]["disagreement_image_share_max"] == 0.05
    # the existing Dice floor still applies, and comes first
    floor = _metrics([0.99, INT8_MIN_IMAGE_DICE - 0.1], [0.001, 0.03])
    assert gate_for("int8", floor).name == "int8-dice" and not gate_for("int8", floor).passed
    # FP16 is not judged by it; older metrics without the field skip the check
    assert gate_for("fp16", bad).passed
    legacy = {k: v for k, v in bad.items() if not k.startswith("disagreement")}
    assert gate_for("int8", legacy).passed
    with pytest.raises(ValueError, match="share"):
        gate_for("int8", ok, max_disagreement=2.0)


def test_int8_per_image_dice_floor_is_an_option_and_the_other_limits_stay():
    # a small polyp at Dice 0.87 whose masks differ on 0.37% of the image: refused by the default floor
    small = _metrics([0.99, 0.87], [0.001, 0.0037])
    assert gate_for("int8", small).name == "int8-dice" and not gate_for("int8", small).passed
    lowered = gate_for("int8", small, min_image_dice=0.85)
    assert lowered.passed and lowered.limits["dice_vs_reference_min"] == 0.85
    assert "below 0.95" in gate_for("int8", _metrics([0.99, 0.94], [0.001, 0.001]), min_image_dice=0.95).reason
    # lowering the floor does not lift the disagreement limit
    jitter = _metrics([0.99, 0.87], [0.001, 0.03])
    assert gate_for("int8", jitter, min_image_dice=0.5).name == "int8-disagreement"
    with pytest.raises(ValueError, match="floor"):
        gate_for("int8", small, min_image_dice=1.5)


def test_export_options_check_the_limit():
    from pathlib import Path

    assert ExportOptions(Path("m"), Path("o"), int8_max_disagreement=0.01).int8_max_disagreement == 0.01
    for bad in (-0.1, 1.5, float("nan"), "1"):
        with pytest.raises(ResUNetError, match="disagreement"):
            ExportOptions(Path("m"), Path("o"), int8_max_disagreement=bad)
        with pytest.raises(ResUNetError, match="Dice floor"):
            ExportOptions(Path("m"), Path("o"), int8_min_image_dice=bad)
    assert ExportOptions(Path("m"), Path("o"), int8_min_image_dice=0.8).int8_min_image_dice == 0.8


def _record(accuracy):
    return {"artifact": {"format": "onnx", "precision": "int8", "accuracy": accuracy}}


def test_record_accepts_and_checks_the_accuracy_fields():
    m = compare_outputs([_probs(_blob((32, 32), 16, 16, 6))], [_probs(_blob((32, 32), 17, 16, 6))])
    acc = {**m, "gate": gate_for("int8", m).as_dict()}
    assert record_problem(_record(acc)) is None
    assert record_problem(_record(None)) is None
    legacy = {k: v for k, v in acc.items() if "disagreement" not in k}
    assert record_problem(_record(legacy)) is None  # records written before the field existed
    cases = {
        "disagreement_image_share_max": 1.5,
        "disagreement_union_share_mean": float("nan"),
        "dice_vs_reference_mean": "0.99",
        "min_union_share": -0.01,
        "images": 0,
        "abs_error_max": -1.0,
        "disagreement_image_share_per_image": [0.1, 2.0],
        "dice_vs_reference_per_image": "x",
        "gate": [],
    }
    for field, value in cases.items():
        problem = record_problem(_record({**acc, field: value}))
        assert problem is not None and problem.field == f"artifact.accuracy.{field}", (field, problem)
    problem = record_problem(_record({**acc, "disagreement_image_share_per_image": [0.1, 0.2]}))
    assert problem is not None and "one number per image" in problem.problem
    bad_limit = {**acc, "gate": {**acc["gate"], "limits": {**acc["gate"]["limits"], "disagreement_image_share_max": 7}}}
    problem = record_problem(_record(bad_limit))
    assert problem.field == "artifact.accuracy.gate.limits.disagreement_image_share_max"
    assert accuracy_problem({**acc, "gate": {**acc["gate"], "passed": "yes"}}).field == "gate.passed"
    assert record_problem(_record([1])).field == "artifact.accuracy"


def test_summary_table_shows_the_worst_image_share(tmp_path):
    from rich.console import Console

    from resunetpp.export.report import print_summary
    from resunetpp.export.results import ArtifactResult, ExportReport

    m = _metrics([0.99, 0.95], [0.001, 0.0042])
    m.update(abs_error_max=0.1, abs_error_mean=0.01, dice_vs_gt_mean=None)
    report = ExportReport(tmp_path, [ArtifactResult("onnx", "int8", tmp_path / "m.onnx", True, 10, m,
                                                    gate_for("int8", m).as_dict())])
    console = Console(record=True, width=200)
    print_summary(report, console)
    text = console.export_text()
    assert "differing pixels" in text and "0.42%" in text
