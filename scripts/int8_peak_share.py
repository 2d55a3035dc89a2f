"""How close the OpenVINO INT8 model runs to this CPU's INT8 convolution peak, and where the rest goes.

    .venv/bin/python scripts/int8_peak_share.py MODEL_INT8.xml [--threads 2] [--rounds 6] [--json OUT]

Measures, interleaved in one process so that a busy machine slows both alike (the best window of
each counts):

* the INT8 peak: :func:`resunetpp.bench.peak.conv_peak` on each of ``INT8_PEAK_SHAPES`` (u8 x int8
  convolution, kernel and runtime precision recorded);
* the model: the OpenVINO INT8 IR at batch 1, 256x256, LATENCY hint, its GOP/s from the FLOPs of
  the shipped model's convolutions (``resunetpp.flops``);
* a per-layer profile of the model (OpenVINO ``PERF_COUNT``): time per (layer type, kernel,
  precision), the integer convolutions' own GOP/s, the float ones', reorders.

The numbers go into benchmarks/PERF.md ("INT8 peak"). Not a test: a measurement tool.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()

    import openvino as ov
    import torch

    from resunetpp.bench.peak import INT8_PEAK_SHAPES, conv_peak
    from resunetpp.checkpoint import load_checkpoint
    from resunetpp.defaults import default_model_path
    from resunetpp.flops import count_flops

    ckpt = load_checkpoint(default_model_path())
    flops = count_flops(ckpt.build_model("cpu"), (3, args.size, args.size)).total
    per_conv = _conv_flops(ckpt, args.size)

    core = ov.Core()
    model = core.read_model(args.model)
    model.reshape([1, 3, args.size, args.size])
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_NUM_THREADS": args.threads, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).normal(size=(1, 3, args.size, args.size)).astype(np.float32)
    request.infer({0: x})

    best_peak: dict[str, dict] = {}
    best_model = float("inf")
    layer_time: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    profiled = 0
    load = []
    for _ in range(args.rounds):
        load.append(os.getloadavg()[0])
        for shape in INT8_PEAK_SHAPES:
            got = conv_peak("int8", args.threads, args.window, shape)
            key = "x".join(map(str, shape))
            if key not in best_peak or got["gops"] > best_peak[key]["gops"]:
                best_peak[key] = got
        calls, start = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - start < args.window:
            request.infer({0: x})
            calls += 1
            for p in request.profiling_info:
                layer_time[(p.node_type, p.exec_type, p.node_name)] += p.real_time.total_seconds()
            profiled += 1
        best_model = min(best_model, (time.perf_counter() - start) / calls)

    peak = max(best_peak.values(), key=lambda r: r["gops"])
    model_gops = flops / best_model / 1e9
    kinds = collections.defaultdict(float)
    for (typ, ex, _), t in layer_time.items():
        kinds[(typ, ex)] += t / profiled
    total = sum(kinds.values())
    runtime = compiled.get_runtime_model()
    conv_prec = {}
    for op in runtime.get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            conv_prec[op.get_friendly_name()] = (info["primitiveType"].astype(str), info["runtimePrecision"].astype(str))
    int8_ms = sum(t for (typ, ex), t in kinds.items() if typ == "Convolution" and "I8" in ex.upper())
    f32_conv_ms = sum(t for (typ, ex), t in kinds.items() if typ == "Convolution" and "I8" not in ex.upper())
    counts = collections.Counter(conv_prec.values())
    float_flops_share = per_conv["float_share"] if per_conv else None
    report = {
        "model": args.model, "threads": args.threads, "size": args.size, "loadavg_1min": load,
        "int8_peak": {"gops": peak["gops"], "kernel": peak["kernel"], "runtime_precision": peak["runtime_precision"],
                      "shape": peak["shape"], "by_shape": {k: v["gops"] for k, v in best_peak.items()}},
        "model_gops": model_gops, "model_ms": best_model * 1e3, "share_of_peak_pct": 100 * model_gops / peak["gops"],
        "profile_ms": {f"{t} {e}": round(v * 1e3, 3) for (t, e), v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "profile_total_ms": total * 1e3,
        "int8_conv_ms": int8_ms * 1e3, "float_conv_ms": f32_conv_ms * 1e3,
        "convolutions_by_kernel": {f"{k} {p}": n for (k, p), n in counts.items()},
        "float_conv_flops_share_expected": float_flops_share,
        "gflop_per_image": flops / 1e9,
    }
    if per_conv:
        int8_flops = flops * (1 - float_flops_share)
        report["int8_convs_own_gops"] = int8_flops / int8_ms / 1e9 if int8_ms else None
        report["int8_convs_own_share_of_peak_pct"] = 100 * report["int8_convs_own_gops"] / peak["gops"]
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _conv_flops(ckpt, size: int) -> dict | None:
    """The share of the model's FLOPs in the convolutions the shipped INT8 recipe keeps in float."""
    import torch

    # the default recipe's keep-float modules (the bench artifacts' recipe, bench_artifacts.json)
    keep = ("stem.body.0", "stem.shortcut.0", "stem.body.3", "encoder1.shortcut.0", "encoder2.body.2",
            "encoder3.body.5", "decoder1.attention.out_conv.2", "decoder3.block.shortcut.0", "head_aspp.project",
            "head")
    model = ckpt.build_model("cpu")
    found = {}

    def hook(name):
        def fn(mod, inp, out):
            found[name] = 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    total = sum(found.values())
    return {"float_share": sum(v for k, v in found.items() if k in keep) / total}


if __name__ == "__main__":
    sys.exit(main())
