"""INT8 sensitivity analysis (export/sensitivity.py) and `resunetpp quantize` on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from resunetpp.cli import app
from resunetpp.export.calibration import synthetic_images
from resunetpp.export.onnx_graph import ShapeSpec, export_onnx, node_scopes
from resunetpp.export.quantize import DEFAULT_EQUALIZE_ALPHA, QDQRecipe, calibrate_ranges
from resunetpp.export.sensitivity import Evaluator, Goal, analyze, run_analysis, search
from resunetpp.checkpoint import Checkpoint, save_checkpoint
from resunetpp.flops import count_flops
from resunetpp.model import ModelConfig, ResUNetPlusPlus, WithActivation
from resunetpp.preprocess import Preprocessing

TINY = ModelConfig(filters=(8, 8, 16, 16), bridge=16)
PRE = Preprocessing(size=(32, 32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model with a confident head, its FP32 ONNX, min-max ranges and held-out inputs."""
    import onnx

    tmp = tmp_path_factory.mktemp("sens")
    torch.manual_seed(0)
    model = ResUNetPlusPlus(TINY).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # large logits: masks that quantization noise does not flip at random
    proto = export_onnx(WithActivation(model), ShapeSpec(3, 1, PRE.size))
    fp32 = tmp / "fp32.onnx"
    onnx.save(proto, str(fp32))
    images = [PRE.apply(im) for im in synthetic_images(PRE, count=10, seed=1)]
    cache = calibrate_ranges(fp32, [x[None] for x in images[:6]], tmp / "ranges.calib", method="minmax")
    return {"model": model, "proto": proto, "fp32": fp32, "cache": cache, "eval": images[6:], "tmp": tmp}


def _break_head_range(tiny) -> str:
    """Copy of the ranges with the head convolution's input range shrunk 10^4-fold (a broken layer)."""
    proto = tiny["proto"]
    scopes = node_scopes(proto)
    head = next(n for n in proto.graph.node if scopes.get(n.name) == "head" and n.op_type == "Conv")
    data = json.loads(tiny["cache"].read_text())
    entry = data["data"][head.input[0]]
    for key in ("lowest", "highest"):  # stored as a number or as {"data": number, ...}
        if isinstance(entry[key], dict):
            entry[key]["data"] = (np.asarray(entry[key]["data"], dtype=np.float64) * 1e-4).tolist()
        else:
            entry[key] = (np.asarray(entry[key], dtype=np.float64) * 1e-4).tolist()
    broken = tiny["tmp"] / "broken.calib"
    broken.write_text(json.dumps(data))
    return str(broken)


@pytest.mark.parametrize("outputs", [False, True])
def test_analysis_ranks_a_deliberately_broken_layer_first(tiny, outputs):
    ev = Evaluator(tiny["fp32"], _break_head_range(tiny), tiny["eval"])
    try:
        rows = analyze(ev, QDQRecipe(method="minmax", keep_modules=(), quantize_outputs=outputs))
    finally:
        ev.close()
    measured = sorted((r for r in rows if r.dice_mean is not None), key=lambda r: (-r.drop, r.group))
    top = [(r.group, r.dice_mean) for r in measured[:4]]
    assert measured[0].group == "head" and measured[0].drop > 0.2, top  # the consumer of the broken range
    if outputs:
        # with Q/DQ on convolution outputs, the producer (head_aspp.project) uses the range too
        assert measured[1].group == "head_aspp.project" and measured[1].drop > 0.2, top
        assert measured[2].drop < measured[1].drop / 2, top
    else:
        assert measured[1].drop < measured[0].drop / 2, top


def test_search_keeps_the_broken_layer_in_float_and_meets_the_goal(tiny):
    ev = Evaluator(tiny["fp32"], _break_head_range(tiny), tiny["eval"])
    try:
        report = run_analysis(ev, QDQRecipe(method="minmax", keep_modules=()), Goal(0.9, 0.5), max_keep=3)
    finally:
        ev.close()
    assert report.steps[0].kept_in_float == [] and not report.steps[0].goal_met
    assert report.chosen[0] == "head"
    assert report.goal_met and report.steps[-1].dice_mean >= 0.9
    d = report.as_dict()
    assert d["kept_in_float"] == report.chosen and d["ranking"][0]["group"] == "head"


def test_search_respects_a_flop_budget(tiny):
    """The broken head is tiny in FLOPs: a budget below its share skips it (and anything larger),
    one above it lets the search keep it; each step records the float share it leaves."""
    flops = count_flops(tiny["model"], (3, *PRE.size))
    head = flops.share(["head"])
    assert 0 < head < 0.01
    ev = Evaluator(tiny["fp32"], _break_head_range(tiny), tiny["eval"])
    try:
        base = QDQRecipe(method="minmax", keep_modules=())
        tight = run_analysis(ev, base, Goal(0.9, 0.5), max_keep=3, flops=flops, max_float_share=head / 2)
        loose = run_analysis(ev, base, Goal(0.9, 0.5), max_keep=3, flops=flops, max_float_share=2 * head)
    finally:
        ev.close()
    assert "head" in tight.over_budget and "head" not in tight.chosen and not tight.goal_met
    assert all(flops.share([g]) > head / 2 for g in tight.over_budget)
    assert all(st.float_flops_share <= head / 2 for st in tight.steps)
    assert loose.chosen[0] == "head" and loose.goal_met
    assert loose.steps[-1].float_flops_share == pytest.approx(flops.share(loose.chosen))
    rows = {g.group: g.flops_share for g in loose.groups}
    assert rows["head"] == pytest.approx(head)
    assert sum(v for v in rows.values() if v is not None) == pytest.approx(1.0)  # the groups tile the model
    d = loose.as_dict()
    assert d["max_float_flops_share"] == 2 * head and d["ranking"][0]["flops_share"] == pytest.approx(head)
    with pytest.raises(ValueError, match="FLOP count"):
        search(ev, base, loose.ranking(), Goal(), max_float_share=0.1)


def test_quantize_cli_writes_the_report(tmp_path, tiny):
    ckpt = tmp_path / "tiny.safetensors"
    sd = {k: v.clone() for k, v in tiny["model"].state_dict().items()}
    save_checkpoint(Checkpoint(TINY, sd, PRE, ["polyp"]), ckpt)
    for name, seed in (("calib", 2), ("eval", 3)):
        folder = tmp_path / name
        folder.mkdir()
        for i, im in enumerate(synthetic_images(PRE, count=4, seed=seed)):
            Image.fromarray(im).save(folder / f"{name}{i}.png")
    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(ckpt), "--calib", str(tmp_path / "calib"), "--eval",
                                      str(tmp_path / "eval"), "--out", str(out), "--method", "minmax",
                                      "--target-dice", "0.5", "--target-min-dice", "0.0", "--max-keep", "1",
                                      "--depth", "3", "--max-float-flops", "5"])
    assert result.exit_code == 0, result.output
    assert "% of the FLOPs)" in " ".join(result.output.split())  # the verdict line names the float cost
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["goal_met"] is True and report["max_float_flops_share"] == 0.05
    groups = {r["group"] for r in report["ranking"]}
    assert {"head", "stem.body.0", "decoder1.attention.out_conv"} <= groups  # depth 3: single convolutions
    assert sum(r["flops_share"] for r in report["ranking"]) == pytest.approx(1.0)  # the groups tile the model
    assert all(s["float_flops_share"] <= 0.05 for s in report["search"])
    assert report["gflop_per_image"] == pytest.approx(count_flops(tiny["model"], (3, *PRE.size)).total / 1e9)
    assert report["calibration"] and report["evaluation"] and report["checkpoint"]["sha256"]
    # the INT8 source's preparation, as the export's sidecars record it
    assert report["base_recipe"]["equalize_alpha"] == report["equalization"]["alpha"] == DEFAULT_EQUALIZE_ALPHA
    assert report["equalization"]["sites"] > 20
    assert report["bias_correction"]["images"] == 4 and report["bias_correction"]["simulated_ranges"] == "percentile 100"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # work folder removed


def test_quantize_cli_refuses_overlapping_sets(tmp_path, tiny):
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(Checkpoint(TINY, dict(tiny["model"].state_dict()), PRE, ["polyp"]), ckpt)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(synthetic_images(PRE, count=2, seed=4)):
        Image.fromarray(im).save(folder / f"x{i}.png")
    result = CliRunner().invoke(app, ["quantize", str(ckpt), "--calib", str(folder), "--eval", str(folder),
                                      "--out", str(tmp_path / "q")])
    assert result.exit_code == 1
    assert "overlap" in result.output and result.output.count("\n") <= 2
