"""Models: a timm backbone (``features_only``) + FPN neck + one head per task, and the
standalone model file format."""
from must_ray.models.export import (
    ModelFileError,
    check_model_file,
    file_sha256,
    load_matching_weights,
    load_model,
    save_model,
)
from must_ray.models.multitask import FPN, MultiTaskModel, build_backbone, images_to_tensor

__all__ = ["FPN", "MultiTaskModel", "build_backbone", "images_to_tensor", "save_model", "load_model",
           "load_matching_weights", "file_sha256", "ModelFileError", "check_model_file"]
