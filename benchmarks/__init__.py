"""Benchmark harness: latency, throughput and accuracy of every artifact on this machine.

Runs each engine of :mod:`engines` under the same inputs (warm-up, timed iterations,
percentiles) and scores it on a dataset, so speed and accuracy are reported side by side;
``resunetpp bench`` is its command line.
"""
