"""Train the shipped Kvasir-SEG model on a lent GPU (one prepared run, see README "Training").

Usage (on the GPU machine, from the repo root, with the 256px data cache made by
``scripts/make_train_cache.py``)::

    python3 scripts/gpu_train_kvasir.py DATA_DIR OUT_DIR BUDGET_S

Trains two runs at once on the one GPU, identical but for the range regulariser
(``range_reg`` 0 and 0.1), each within BUDGET_S seconds, then checks that the fp16-stored copy
of each evaluates like the fp32 weights and writes both as fp16 safetensors into OUT_DIR.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import os
DEVICE = os.environ.get("TRAIN_DEVICE", "cuda")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(name: str, data: str, out: str, budget: float, range_reg: float) -> None:
    import os
    os.environ["RESUNETPP_LOG_EPOCHS"] = "1"
    from resunetpp.training import TrainConfig, train

    cfg = TrainConfig(data=data, out=str(Path(out) / name), epochs=int(budget), batch_size=16, lr=1e-3,
                      image_size=256, device=DEVICE, range_reg=range_reg, time_budget_s=None,
                      val_every=5, workers=8)
    log = open(Path(out) / f"{name}.log", "w")

    def p(msg: str) -> None:
        print(f"[{name}] {msg}", flush=True)
        log.write(msg + "\n")
        log.flush()

    train(cfg, progress=False, log=p)


def check_fp16(out: Path, name: str, data: str) -> dict:
    import numpy as np
    import torch

    from resunetpp.checkpoint import load_checkpoint, save_checkpoint
    from resunetpp.data import SegmentationDataset
    from resunetpp.evaluation import evaluate, torch_predict_fn

    last = load_checkpoint(out / name / "last.safetensors")
    half = save_checkpoint(last, out / f"{name}.fp16.safetensors", dtype=torch.float16)
    ds = SegmentationDataset(data, "val")
    res = {}
    for tag, ck in (("fp32", last), ("fp16_stored", load_checkpoint(half))):
        r = evaluate(torch_predict_fn(ck.build_model(DEVICE), DEVICE), ds, ck.preprocessing, batch_size=16)
        res[tag] = r.mean.as_dict()
    res["provenance"] = last.provenance
    return res


if __name__ == "__main__":
    data, out, budget = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run, args=(n, data, str(out), budget, r))
             for n, r in (("baseline", 0.0), ("rangereg", 0.1))]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()
    print(f"training done in {time.time() - t:.0f}s, exit codes {[pr.exitcode for pr in procs]}", flush=True)
    summary = {}
    for n in ("baseline", "rangereg"):
        try:
            summary[n] = check_fp16(out, n, data)
        except Exception as e:  # report and go on: the other run's result still comes back
            summary[n] = {"error": repr(e)}
        print(n, json.dumps(summary[n].get("fp32", summary[n])), json.dumps(summary[n].get("fp16_stored", "")), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
