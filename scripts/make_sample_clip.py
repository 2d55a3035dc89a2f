"""Stitch real Kvasir-SEG frames into the sample clip ``resunetpp/sample_data/clip.mp4``.

Each image (the 20 shipped sample images by default, in ``val.txt`` order) is fitted into a
``--size`` frame (aspect kept, centred, black borders like an endoscope's) and held for
``--hold`` frames; the clip is H.264 (``yuv420p``, CRF 18) at ``--fps`` through
:class:`resunetpp.video.VideoWriter`. With the defaults: 60 frames, 384x320, 25 fps, 2.4 s.

    python scripts/make_sample_clip.py                      # the shipped clip
    python scripts/make_sample_clip.py --images ../shared/data/kvasir-seg/images --list val.txt \\
        --count 60 --hold 1 --out runs/kvasir60.mp4        # 60 distinct validation images
    python scripts/make_sample_clip.py --size 1280x720 --out runs/clip720.mp4   # upscaled, for benchmarks
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from resunetpp.video import VideoWriter, probe

HERE = Path(__file__).resolve().parents[1]
SAMPLE = HERE / "resunetpp" / "sample_data"


def frames_from(images: list[Path], size: tuple[int, int], hold: int):
    w, h = size
    for path in images:
        with Image.open(path) as img:
            fitted = ImageOps.pad(img.convert("RGB"), (w, h), method=Image.LANCZOS, color=(0, 0, 0))
        frame = np.asarray(fitted)
        for _ in range(hold):
            yield frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=SAMPLE / "images", help="folder of the images")
    ap.add_argument("--list", type=Path, default=SAMPLE / "val.txt",
                    help="stems in order, one a line (a file, or a name inside --images' parent)")
    ap.add_argument("--count", type=int, default=20, help="how many images")
    ap.add_argument("--hold", type=int, default=3, help="frames each image is held")
    ap.add_argument("--fps", type=str, default="25", help="frame rate (25, 30000/1001 ...)")
    ap.add_argument("--size", type=str, default="384x320", help="WIDTHxHEIGHT of the clip")
    ap.add_argument("--crf", type=int, default=18, help="x264 constant quality (18: visually lossless)")
    ap.add_argument("--out", type=Path, default=SAMPLE / "clip.mp4")
    args = ap.parse_args()

    listing = args.list if args.list.is_file() else args.images.parent / args.list
    stems = [s.strip() for s in listing.read_text().splitlines() if s.strip()][:args.count]
    images = []
    for stem in stems:
        found = sorted(args.images.glob(f"{stem}.*"))
        if not found:
            raise SystemExit(f"{args.images}: no image named {stem}.*")
        images.append(found[0])
    w, h = (int(v) for v in args.size.lower().split("x"))
    with VideoWriter(args.out, w, h, Fraction(args.fps), crf=args.crf, preset="slow") as writer:
        for frame in frames_from(images, (w, h), args.hold):
            writer.write(frame)
    info = probe(args.out)
    print(f"{args.out}: {info.frames} frames, {info.width}x{info.height}, {info.fps} fps, {info.codec}, "
          f"{args.out.stat().st_size / 1024:.0f} KiB, from {len(images)} images of {args.images}")


if __name__ == "__main__":
    main()
