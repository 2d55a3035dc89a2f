"""``resunetpp.memory.reuse_freed_memory``: large freed blocks reused instead of fresh pages (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = r"""
import resource, sys
import torch
from resunetpp.memory import reuse_freed_memory
if sys.argv[1] == "on":
    assert reuse_freed_memory()
torch.set_num_threads(1)
convs = [torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(3)]
def forward():  # what a pass does: a new 64 MiB activation per layer, the previous one freed
    with torch.no_grad():
        x = torch.randn(16, 16, 256, 256)
        for conv in convs:
            x = torch.relu(conv(x))
forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="mallopt thresholds are glibc's")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    """Three passes of a small convolution stack over 64 MiB activations: by default every activation
    is a fresh mmap whose 16,384 pages fault in again; after reuse_freed_memory() most come from
    the heap, already mapped (the export's bias correction: 3.7 million faults -> 0.3)."""
    def run(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True)
        return int(out.stdout.strip())

    default, reused = run("off"), run("on")
    assert default > 3 * 4 * 16000, default  # the input and three outputs, three times
    assert reused < default / 3, (default, reused)
