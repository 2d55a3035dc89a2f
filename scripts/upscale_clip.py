"""Upscale a video clip to given sizes (the 720p / 1080p inputs of the live-stream measurement).

Usage::

    python3 scripts/upscale_clip.py CLIP.mp4 1280x720 1920x1080

Writes ``CLIP_720p.mp4`` and ``CLIP_1080p.mp4`` beside CLIP (H.264, the same frame count and rate),
each frame resized with Pillow's bicubic filter. No ffmpeg binary is needed: decoding and encoding
are PyAV's (:mod:`resunetpp.video`). An output that exists is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resunetpp.video import VideoReader, VideoWriter  # noqa: E402


def size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if width < 2 or height < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: too small")
    return width, height


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", type=Path)
    parser.add_argument("sizes", type=size, nargs="+", metavar="WxH")
    args = parser.parse_args()
    for width, height in args.sizes:
        out = args.clip.with_name(f"{args.clip.stem}_{height}p{args.clip.suffix}")
        if out.exists():
            print(f"error: {out} exists", file=sys.stderr)
            return 1
        with VideoReader(args.clip) as reader, VideoWriter(out, width, height, reader.info.fps or 25) as writer:
            for frame in reader:
                writer.write(np.asarray(Image.fromarray(frame.image).resize((width, height), Image.BICUBIC)))
        print(f"{out}: {writer.frames_written} frames, {width}x{height}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
