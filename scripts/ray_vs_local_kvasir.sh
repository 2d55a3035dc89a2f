#!/bin/bash
# The README's `infer --ray` measurement: local infer vs infer --ray local over the 120 Kvasir-SEG
# validation images with the shipped model, a rerun that must skip everything, and a file-by-file
# comparison of the masks. Usage: scripts/ray_vs_local_kvasir.sh [KVASIR_DIR] [OUT_DIR]
set -euo pipefail
D=${1:-../shared/data/kvasir-seg}
R=${2:-runs/ray-vs-local}
BIN=${RESUNETPP:-.venv/bin/resunetpp}
PY=${PYTHON:-.venv/bin/python}
rm -rf "$R/local" "$R/ray"
mkdir -p "$R"
mapfile -t FILES < <(sed "s|^|$D/images/|; s|$|.jpg|" "$D/val.txt")
stamp() { echo "[$1] $(date +%T) load average $(cut -d' ' -f1-3 /proc/loadavg)"; }
stamp "local"
/usr/bin/time -f "local: wall %e s" "$BIN" infer default "${FILES[@]}" --out "$R/local" --json "$R/local.json"
stamp "ray"
/usr/bin/time -f "ray: wall %e s" "$BIN" infer default "${FILES[@]}" --out "$R/ray" --ray local --workers 2 \
    --threads-per-worker 1 --json "$R/ray.json"
stamp "ray rerun"
/usr/bin/time -f "ray rerun: wall %e s" "$BIN" infer default "${FILES[@]}" --out "$R/ray" --ray local --workers 2 \
    --json "$R/ray-rerun.json"
stamp "end"
"$PY" - "$R" <<'PY'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
local = sorted(p.name for p in (r / "local").glob("*_mask.png"))
ray = sorted(p.name for p in (r / "ray").iterdir())
assert ray == local, "the Ray run's files differ from the local run's"
same = sum((r / "local" / n).read_bytes() == (r / "ray" / n).read_bytes() for n in local)
rerun = json.loads((r / "ray-rerun.json").read_text())
print(f"{len(local)} masks, {same} byte-identical; rerun skipped {rerun['skipped']}, wrote {rerun['written']}")
for name in ("local", "ray"):
    d = json.loads((r / f"{name}.json").read_text())
    print(f"{name}: {d['written']} written, {d['end_to_end_images_per_second']} img/s end-to-end", d.get("ray", ""))
PY
