"""vwe: visual-word CAM networks for weakly-supervised semantic segmentation, trained on clusters."""

__version__ = "0.1.0"
