"""The arithmetic rate this CPU attains, measured, so a benchmark's GFLOP/s reads against this machine.

A rate quoted from a data sheet (cores x clock x FLOP per cycle) can be wrong by 2x: issue 6
compared the OpenVINO FP32 row with a "peak of ~525 GFLOP/s" for the 2-core benchmark box, whose
cores (CPUID family 25, i.e. Zen 4) run an AVX-512 FMA as two 256-bit halves -- an FMA
micro-benchmark there reaches 117 GFLOP/s per core, 234 on both (benchmarks/PERF.md). Against the
quoted number the toolkit looked 2.5x slow; against the measured one OpenVINO FP32 runs at
about 85% of the ceiling.

:func:`conv_peak` times one compute-bound convolution compiled by OpenVINO's CPU plugin at a
given inference precision and thread count -- the kernels the model's own convolutions use -- and
reports the best of a few short windows (the machine may be shared). :func:`cpu_peaks` takes the
best of three 3x3 shapes (:data:`PEAK_SHAPES`; which one the plugin runs fastest varies by
precision and from run to run, by +-10% on the benchmark box): 220 of the 234 GFLOP/s FMA ceiling
in FP32 there, about 430 of 468 in BF16. A model's row can come out a few percent above it --
the peak is what one isolated layer attains, not a hard bound.
"""

from __future__ import annotations

import time

import numpy as np

#: (batch, channels in, channels out, side, kernel) of the measured convolutions; the first is
#: the shape of ResUNet++'s bridge (9.7 GFLOP a call).
PEAK_SHAPES = ((4, 256, 256, 32, 3), (1, 512, 512, 32, 3), (2, 512, 512, 16, 3))
CONV_SHAPE = PEAK_SHAPES[0]
#: OpenVINO precision hints measured by :func:`cpu_peaks` (bf16 only where the CPU has it).
PEAK_PRECISIONS = ("f32", "bf16")


def conv_flops(shape: tuple[int, int, int, int, int] = CONV_SHAPE) -> int:
    """FLOPs of one call of the measured convolution (2 per multiply-add, 'same' padding)."""
    n, cin, cout, side, k = shape
    return 2 * n * cout * side * side * cin * k * k


def conv_peak(precision: str = "f32", threads: int | None = None, seconds: float = 1.0,
              shape: tuple[int, int, int, int, int] = CONV_SHAPE) -> dict:
    """GFLOP/s of one compute-bound convolution on the OpenVINO CPU plugin at ``precision``
    (an ``INFERENCE_PRECISION_HINT``: ``f32``, ``bf16``), the best of five windows of
    ``seconds / 5``; with the kernel OpenVINO picked (``brgconv_avx512_f32`` ...). The convolution
    is built and compiled by the engines layer
    (:func:`resunetpp.engines.openvino_engine.compile_conv`); only the timing is done here."""
    from resunetpp.engines.openvino_engine import compile_conv

    conv = compile_conv(shape, precision, threads)
    infer = conv.infer
    x = np.random.default_rng(1).normal(size=conv.input_shape).astype(np.float32)
    infer(x)
    best = float("inf")
    for _ in range(5):
        calls, start = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - start < seconds / 5:
            infer(x)
            calls += 1
        best = min(best, (time.perf_counter() - start) / calls)
    return {"precision": precision, "gflops": conv_flops(shape) / best / 1e9, "kernel": conv.kernel,
            "threads": conv.threads, "shape": list(shape)}


def cpu_peaks(threads: int | None = None, bf16: bool = True, seconds: float = 3.0) -> dict[str, dict]:
    """Per precision of :data:`PEAK_PRECISIONS` (``bf16`` only when ``bf16``), the fastest of
    :func:`conv_peak` over :data:`PEAK_SHAPES`, ``seconds`` spread over all of them."""
    out = {}
    for p in PEAK_PRECISIONS:
        if p == "bf16" and not bf16:
            continue
        each = seconds / (len(PEAK_PRECISIONS) * len(PEAK_SHAPES))
        out[p] = max((conv_peak(p, threads, each, shape) for shape in PEAK_SHAPES), key=lambda r: r["gflops"])
    return out


def main() -> None:
    """``python -m resunetpp.bench.peak [THREADS]``: print the measured peaks."""
    import sys

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else None
    for p, r in cpu_peaks(threads, seconds=6.0).items():
        print(f"{p}: {r['gflops']:.0f} GFLOP/s ({r['kernel']}, {r['threads']} threads, conv "
              f"{'x'.join(map(str, r['shape']))})")


if __name__ == "__main__":
    main()
