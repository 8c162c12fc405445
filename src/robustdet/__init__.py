"""robustdet: Bayesian RetinaNet losses and dynamic multi-scale loss weighting on torchvision detectors."""

__version__ = "0.1.0"
