"""Train Kvasir-SEG models on a lent GPU in one prepared, time-boxed run (see README "Training").

Usage (on the GPU machine, from the repo root; DATA is a Kvasir-SEG folder, ideally pre-resized
to 256 px so that loading takes seconds)::

    python3 scripts/gpu_train_kvasir.py DATA OUT BUDGET_S [--run NAME:key=value,...]...

Each ``--run`` is one ``TrainConfig`` (``key=value`` pairs override the defaults below: lr,
range_reg, init_from, warmup_epochs, batch_size, seed, ...). All runs train at the same time on
the one GPU, each sized by ``--time-budget-s`` semantics to finish inside BUDGET_S seconds
(counted from its start; the run is sized from its second epoch). Without ``--run`` the runs are
``DEFAULT_RUNS``.

While they train, a watcher copies each run's latest weights into OUT as fp16 safetensors every
``--snapshot-s`` seconds (write to a temporary name, then rename), together with ``summary.json``
(every run's history so far), so that a lease that ends early still brings back the last
completed epoch. OUT then holds at most ``len(runs) + 2`` files: ``NAME.fp16.safetensors`` per
run, ``summary.json`` and ``train.log``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHIPPED = "resunetpp/weights/resunetpp_kvasir.safetensors"
DEFAULT_RUNS = [
    # continue the shipped 21-epoch model (cosine restarts from these LRs)
    f"ft_lr1e-3:init_from={SHIPPED},lr=1e-3,warmup_epochs=2,range_reg=0.1",
    f"ft_lr4e-4:init_from={SHIPPED},lr=4e-4,warmup_epochs=1,range_reg=0.1",
    # from scratch, as `make train-kvasir` does (for the record of what the budget alone reaches)
    "scratch:lr=1e-3,range_reg=0.1",
]


def parse_run(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    if not name or not all(c.isalnum() or c in "._-" for c in name):
        raise SystemExit(f"--run {spec!r}: the name must be letters, digits, '.', '_' or '-'")
    over: dict = {}
    for kv in filter(None, rest.split(",")):
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--run {spec!r}: {kv!r} is not key=value")
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return name, over


def run(name: str, over: dict, data: str, work: str, budget: float, device: str, log_path: str) -> None:
    os.environ["RESUNETPP_LOG_EPOCHS"] = "1"
    from resunetpp.training import TrainConfig, train

    kw = dict(data=data, out=str(Path(work) / name), epochs=1000, batch_size=16, lr=1e-3, image_size=256,
              device=device, range_reg=0.1, time_budget_s=budget, val_every=5, workers=4)
    kw.update(over)
    cfg = TrainConfig(**kw)
    with open(log_path, "a") as log:
        def p(msg: str) -> None:
            line = f"[{name}] {msg}"
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        p(f"config {json.dumps(over)}")
        try:
            train(cfg, progress=False, log=p)
        except BaseException as e:  # noqa: BLE001 - report in the shared log, then fail the process
            p(f"FAILED: {e!r}")
            raise


def snapshot(names: list[str], work: Path, out: Path, started: float) -> None:
    """Copy each run's latest weights (fp16) and all histories into OUT, atomically."""
    import torch

    from resunetpp.checkpoint import load_checkpoint, save_checkpoint

    summary = {"elapsed_s": round(time.time() - started, 1), "runs": {}}
    for n in names:
        last = work / n / "last.safetensors"
        hist = work / n / "history.json"
        entry: dict = {}
        try:
            if hist.is_file():
                entry["history"] = json.loads(hist.read_text())
            if last.is_file():
                ck = load_checkpoint(last, verify=False)
                entry["epochs_completed"] = ck.provenance.get("epochs_completed")
                save_checkpoint(ck, out / f"{n}.fp16.safetensors", dtype=torch.float16)
        except Exception as e:  # a file being replaced right now: the next snapshot gets it
            entry["snapshot_error"] = repr(e)
        summary["runs"][n] = entry
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("out", type=Path)
    ap.add_argument("budget_s", type=float)
    ap.add_argument("--run", action="append", dest="runs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/resunetpp_gpu_runs"))
    ap.add_argument("--snapshot-s", type=float, default=45.0)
    ap.add_argument("--device", default=os.environ.get("TRAIN_DEVICE", "cuda"))
    a = ap.parse_args()
    runs = [parse_run(s) for s in (a.runs or DEFAULT_RUNS)]
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    log_path = str(a.out / "train.log")
    started = time.time()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run, args=(n, o, a.data, str(a.work), a.budget_s, a.device, log_path))
             for n, o in runs]
    for pr in procs:
        pr.start()
    names = [n for n, _ in runs]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(a.snapshot_s):
            snapshot(names, a.work, a.out, started)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for pr in procs:
        pr.join()
    stop.set()
    watcher.join()
    snapshot(names, a.work, a.out, started)
    codes = [pr.exitcode for pr in procs]
    print(f"training done in {time.time() - started:.0f}s, exit codes {codes}", flush=True)
    summary = json.loads((a.out / "summary.json").read_text())
    for n in names:
        h = summary["runs"][n].get("history", [])
        vals = [(r["epoch"], r["val_dice"]) for r in h if "val_dice" in r]
        print(n, "epochs", len(h), "val Dice (training resolution) last:", vals[-1] if vals else None, flush=True)
    sys.exit(1 if any(codes) else 0)


if __name__ == "__main__":
    main()
