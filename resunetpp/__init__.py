"""resunetpp: a reference ResUNet++ and the toolkit that takes it to the edge."""

from resunetpp.model import ModelConfig, ResUNetPlusPlus, WithActivation, count_parameters

__version__ = "0.1.0"
__all__ = ["ModelConfig", "ResUNetPlusPlus", "WithActivation", "count_parameters", "__version__"]
