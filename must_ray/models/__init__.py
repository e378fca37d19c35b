"""Models: a timm backbone (``features_only``) + FPN neck + one head per task."""
from must_ray.models.multitask import FPN, MultiTaskModel, build_backbone

__all__ = ["FPN", "MultiTaskModel", "build_backbone"]
