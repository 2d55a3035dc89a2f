"""Building blocks of ResUNet++, one concept per file.

* :class:`SqueezeExcitation` -- channel gating (Hu et al., CVPR 2018).
* :class:`StemBlock`, :class:`ResidualBlock` -- (pre-activation) residual units.
* :class:`ASPP` -- atrous spatial pyramid pooling as ResUNet++ uses it (summed branches).
* :class:`AttentionBlock` -- the decoder's skip/decoder attention (unbounded product).
"""

from resunetpp.blocks.aspp import ASPP
from resunetpp.blocks.attention import AttentionBlock
from resunetpp.blocks.residual import ResidualBlock, StemBlock
from resunetpp.blocks.se import SqueezeExcitation

__all__ = ["ASPP", "AttentionBlock", "ResidualBlock", "SqueezeExcitation", "StemBlock"]
