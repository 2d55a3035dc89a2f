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

The INT8 peak (issue 19) is the same measurement on a quantized convolution -- u8 activations,
int8 weights, as NNCF quantizes the model (:func:`resunetpp.engines.openvino_engine.compile_conv`) --
over :data:`INT8_PEAK_SHAPES`, which adds the 512-channel bridge-sized convolution, batch 4, that
integer kernels run fastest. Its rate is in GOP/s (integer multiply-adds, 2 per MAC) and the entry
records the kernel and the precision it ran in (``runtimePrecision``): a convolution the plugin
left in float is not an INT8 peak, and is refused. Which INT8 kernel runs depends on the CPU:
``brgconv_avx512_core_vnni`` with AVX512-VNNI, ``jit_avx2_vnni`` with AVX-VNNI, ``jit_avx2_I8``
(u8 x s8 via ``vpmaddubsw``, no VNNI) on a plain AVX2 CPU.
"""

from __future__ import annotations

import time

import numpy as np

#: (batch, channels in, channels out, side, kernel) of the measured convolutions; the first is
#: the shape of ResUNet++'s bridge (9.7 GFLOP a call).
PEAK_SHAPES = ((4, 256, 256, 32, 3), (1, 512, 512, 32, 3), (2, 512, 512, 16, 3))
CONV_SHAPE = PEAK_SHAPES[0]
#: The INT8 peak's shapes: :data:`PEAK_SHAPES` and the 512-channel 3x3 convolution on 32x32, batch 4
#: (the shape issue 19 measured: 744 GOP/s INT8 against 225 f32 and 424 bf16 on an idle Zen 4).
INT8_PEAK_SHAPES = (*PEAK_SHAPES, (4, 512, 512, 32, 3))
#: Precisions measured by :func:`cpu_peaks` (bf16 only where the CPU has it, int8 only when asked).
PEAK_PRECISIONS = ("f32", "bf16", "int8")


def conv_flops(shape: tuple[int, int, int, int, int] = CONV_SHAPE) -> int:
    """FLOPs of one call of the measured convolution (2 per multiply-add, 'same' padding)."""
    n, cin, cout, side, k = shape
    return 2 * n * cout * side * side * cin * k * k


def conv_peak(precision: str = "f32", threads: int | None = None, seconds: float = 1.0,
              shape: tuple[int, int, int, int, int] = CONV_SHAPE) -> dict:
    """GFLOP/s (GOP/s for ``int8``) of one compute-bound convolution on the OpenVINO CPU plugin at
    ``precision`` (an ``INFERENCE_PRECISION_HINT``: ``f32``, ``bf16``; or ``int8``), the best of
    five windows of ``seconds / 5``; with the kernel OpenVINO picked (``brgconv_avx512_f32``,
    ``jit_avx2_I8`` ...) and the precision it computes in. The convolution is built and compiled by
    the engines layer (:func:`resunetpp.engines.openvino_engine.compile_conv`); only the timing is
    done here. Raises :class:`~resunetpp.errors.ResUNetError` when an ``int8`` convolution does not
    run as one (the plugin kept it in float)."""
    from resunetpp.engines.openvino_engine import INT8_RUNTIME_PRECISIONS, compile_conv
    from resunetpp.errors import ResUNetError

    conv = compile_conv(shape, precision, threads)
    if precision == "int8" and conv.runtime_precision not in INT8_RUNTIME_PRECISIONS:
        raise ResUNetError(f"the quantized peak convolution ran as {conv.kernel} in {conv.runtime_precision}, "
                           "not in int8: this OpenVINO CPU plugin has no INT8 convolution here")
    infer = conv.infer
    x = np.random.default_rng(1).normal(size=conv.input_shape).astype(np.float32)
    infer(x)
    best = float("inf")
    for _ in range(5):
        calls, start = 0, time.perf_counter()
        while calls < 1 or time.perf_counter() - start < seconds / 5:  # a call longer than the window: one
            infer(x)
            calls += 1
        best = min(best, (time.perf_counter() - start) / calls)
    rate = conv_flops(shape) / best / 1e9
    out = {"precision": precision, "gflops": rate, "kernel": conv.kernel, "runtime_precision": conv.runtime_precision,
           "threads": conv.threads, "shape": list(shape)}
    if precision == "int8":
        out.update(gops=rate, unit="GOP/s")
    return out


def peak_shapes(precision: str) -> tuple[tuple[int, int, int, int, int], ...]:
    """The convolutions :func:`cpu_peaks` times at ``precision``."""
    return INT8_PEAK_SHAPES if precision == "int8" else PEAK_SHAPES


def cpu_peaks(threads: int | None = None, bf16: bool = True, seconds: float = 3.0, int8: bool = False,
              problems: dict[str, str] | None = None) -> dict[str, dict]:
    """Per precision of :data:`PEAK_PRECISIONS` (``bf16`` only when ``bf16``, ``int8`` only when
    ``int8``), the fastest of :func:`conv_peak` over :func:`peak_shapes`, ``seconds / 2`` per
    precision (as when f32 and bf16 were the only ones) spread over its shapes; ``by_shape`` holds
    every shape's rate. A precision that cannot be measured (an INT8 convolution the plugin runs in
    float) is left out, and why goes into ``problems`` when given."""
    out = {}
    for p in PEAK_PRECISIONS:
        if (p == "bf16" and not bf16) or (p == "int8" and not int8):
            continue
        shapes = peak_shapes(p)
        each = seconds / (2 * len(shapes))
        try:
            measured = [conv_peak(p, threads, each, shape) for shape in shapes]
        except Exception as e:  # noqa: BLE001 - the other precisions stand without this one
            if problems is None:
                raise
            problems[p] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            continue
        best = max(measured, key=lambda r: r["gflops"])
        out[p] = {**best, "by_shape": {"x".join(map(str, r["shape"])): round(r["gflops"], 1) for r in measured}}
    return out


def main() -> None:
    """``python -m resunetpp.bench.peak [THREADS]``: print the measured peaks."""
    import sys

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else None
    problems: dict[str, str] = {}
    for p, r in cpu_peaks(threads, seconds=6.0, int8=True, problems=problems).items():
        print(f"{p}: {r['gflops']:.0f} {r.get('unit', 'GFLOP/s')} ({r['kernel']} in {r['runtime_precision']}, "
              f"{r['threads']} threads, conv {'x'.join(map(str, r['shape']))}; by shape {r['by_shape']})")
    for p, why in problems.items():
        print(f"{p}: not measured: {why}")


if __name__ == "__main__":
    main()
