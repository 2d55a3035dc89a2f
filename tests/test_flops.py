"""FLOPs per module (resunetpp/flops.py): what keeping a part of the network in float costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resunetpp.flops import count_flops
from resunetpp.model import ModelConfig, ResUNetPlusPlus


class _Branchy(nn.Module):
    """A container (ModuleList) that never runs forward itself, as in ResUNet++'s ASPP."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU()) for _ in range(2)])
        self.head = nn.Conv2d(8, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.cat([b(x) for b in self.branches], 1))


def test_own_flops_are_the_convolutions_multiply_adds_times_two():
    c = count_flops(_Branchy(), (3, 16, 16))
    px = 16 * 16
    stem, branch, head = 2 * px * 8 * 3 * 9, 2 * px * 4 * 8, 2 * px * 1 * 8
    assert c.own["stem"] == stem and c.own["head"] == head
    assert c.own["branches.0.0"] == c.own["branches.1.0"] == branch
    assert c.total == stem + 2 * branch + head == sum(c.own.values())  # nothing counted twice
    assert c.under("branches") == 2 * branch and c.under("") == c.total
    assert c.share(["head", "branches.1"]) == pytest.approx((head + branch) / c.total)
    assert c.share(["branches", "branches.0.0"]) == pytest.approx(2 * branch / c.total)  # overlap counted once
    assert c.groups(1) == {"stem": stem, "branches": 2 * branch, "head": head}


def test_resunetpp_matches_the_official_count_and_its_groups_cover_it():
    c = count_flops(ResUNetPlusPlus(), (3, 256, 256))
    assert c.total / 1e9 == pytest.approx(31.3, abs=0.05)  # the authors' 16-32-64-128 model at 256x256
    groups = c.groups(2)
    assert sum(groups.values()) == c.total
    # the three decoder levels do the same work; the two image-reading convolutions almost none
    assert groups["decoder1.block"] == pytest.approx(groups["decoder3.block"], rel=1e-5)
    assert c.share(["stem.body.0", "stem.shortcut.0"]) < 0.005
    small = count_flops(ResUNetPlusPlus(ModelConfig(filters=(8, 8, 16, 16), bridge=16)), (3, 32, 32))
    assert 0 < small.total < c.total / 1000


def test_input_shape_is_checked():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        count_flops(_Branchy(), (1, 3, 16, 16))
