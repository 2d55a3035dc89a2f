"""Benchmark harness: latency, throughput and accuracy of every artifact on this machine.

Runs each engine of :mod:`resunetpp.engines` under the same inputs (warm-up, timed iterations,
percentiles) and scores it on a dataset, so speed and accuracy are reported side by side;
``resunetpp bench`` is its command line.
"""

if __name__ != "resunetpp.bench":  # the folder `benchmarks/` installs as `resunetpp.bench`; never as a second, bare copy
    raise ImportError(f"import resunetpp.bench, not {__name__}: this folder is installed as resunetpp.bench "
                      "(pip install -e . or pip install resunetpp)")



