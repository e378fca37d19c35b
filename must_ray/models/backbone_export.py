"""The general backbone as a product: a must-ray model's backbone in the formats users load.

:func:`export_backbone` writes a Hugging Face timm model folder (``model.safetensors`` and a
``config.json`` holding timm's ``pretrained_cfg``, written by timm's own ``save_for_hf``), which
stock timm loads offline in three ways, all checked by ``tests/models/test_backbone_export.py``::

    timm.create_model("local-dir:FOLDER", pretrained=True, num_classes=N)          # a classifier
    timm.create_model("local-dir:FOLDER", pretrained=True, features_only=True)    # feature maps
    timm.create_model(ARCH, pretrained=True, **{**MODEL_ARGS, "num_classes": N},
                      pretrained_cfg_overlay=dict(file="FOLDER/model.safetensors"))

(``ARCH``, ``MODEL_ARGS``: ``architecture``, ``model_args`` of ``config.json``) and
``hf-hub:USER/NAME`` once the folder is pushed unchanged. Our backbone is a timm
``features_only`` wrapper, whose parameter names differ from the classifier's where timm
flattened sequential stages (ConvNeXt ``stages_0`` vs ``stages.0``) or wrapped the model (ViT
``model.blocks``); the names are mapped back with timm's own table of the flattening
(``_module_list``), never by pattern. Parts a ``features_only`` model drops (a ViT's final norm, a
ConvNeXt's head norm) were never trained: they are exported at timm's initialisation and listed
under ``untrained`` in the summary and in ``config.json``.

:func:`export_program` writes the whole multi-task model as a ``torch.export`` program that
takes uint8 images, for inference without must-ray.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import numpy as np
import timm
import torch
from timm.models._features import FeatureGetterNet, _module_list
from timm.models._hub import save_for_hf
from torch import nn

from must_ray.models.backbones import timm_architecture
from must_ray.models.export import file_sha256, load_model
from must_ray.models.multitask import IMAGENET_MEAN, IMAGENET_STD, MultiTaskModel
from must_ray.typed_config import ConfigError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROGRAM_FILE = "multitask.pt2"
#: the config.json key with what must-ray knows about the export (timm ignores unknown keys)
MUST_RAY_KEY = "must_ray"


def timm_classifier(model: MultiTaskModel) -> tuple[nn.Module, list[str]]:
    """The plain timm model (no classifier, ``num_classes=0``) of ``model``'s backbone, holding its
    weights, and the names of its tensors the backbone does not have (kept at timm's init)."""
    arch, args = timm_architecture(model.backbone_name)
    plain = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    names = plain_names(model.backbone, plain)
    own = plain.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in model.backbone.state_dict().items():
        target = names(key)
        if target not in own or own[target].shape != value.shape:
            raise ValueError(f"backbone tensor {key} has no counterpart in timm's {arch} "
                             f"(looked for {target}); the backbone was not built by must_ray.models")
        mapped[target] = value
    untrained = sorted(set(own) - set(mapped))
    plain.load_state_dict({**own, **mapped}, strict=True)
    return plain.eval(), untrained


def plain_names(features: nn.Module, plain: nn.Module):
    """A function mapping a parameter name of the ``features_only`` wrapper ``features`` to its
    name in the plain timm model ``plain`` of the same architecture."""
    if isinstance(features, FeatureGetterNet):
        return lambda key: key.removeprefix("model.")
    heads = {name: name for name, _ in plain.named_children()}
    heads.update({flat: dotted for flat, dotted, _ in _module_list(plain, flatten_sequential=True)})

    def rename(key: str) -> str:
        head, _, rest = key.partition(".")
        return f"{heads.get(head, head)}.{rest}" if rest else heads.get(head, head)

    return rename


def export_backbone(model_path: str, out_dir: str, *, overwrite: bool = False, verify: bool = True,
                    program: bool = False) -> dict[str, Any]:
    """Write the backbone of must-ray model file ``model_path`` (a student or a teacher) as a Hugging
    Face timm folder ``out_dir`` (see the module docstring); ``program`` adds the whole multi-task
    model as ``multitask.pt2``. ``verify`` reloads the folder through timm and records the largest
    difference of its feature maps from the model's own. The folder appears complete or not at
    all; an existing one is replaced only with ``overwrite``. Returns the job summary."""
    if os.path.exists(out_dir) and not overwrite:
        raise ConfigError(f"--out {out_dir} already exists; pass --overwrite to replace it, or choose a new folder")
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, CONFIG_FILE)):
        raise ConfigError(f"--out {out_dir} exists and is not an exported backbone folder (no {CONFIG_FILE}); "
                          "refusing to replace it: choose a new folder")
    model, info = load_model(model_path)
    plain, untrained = timm_classifier(model)
    arch, _ = timm_architecture(model.backbone_name)
    size = int(info["image_size"])
    out_indices = [int(i) for i in model.backbone.feature_info.out_indices]
    provenance = {"source": os.path.abspath(model_path), "source_sha256": info["sha256"],
                  "backbone": model.backbone_name, "tasks": list(info["tasks"]), "classes": list(info["classes"]),
                  "feature_out_indices": out_indices, "untrained": untrained}
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_for_hf(plain, tmp, safe_serialization=True, model_config={MUST_RAY_KEY: provenance},
                    data_config={"input_size": (3, size, size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                 "crop_pct": 1.0, "interpolation": "bilinear"})
        if program:
            export_program(model, size, os.path.join(tmp, PROGRAM_FILE))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(out_dir, CONFIG_FILE)) as f:  # timm's record of the architecture's arguments
        model_args = {k: v for k, v in json.load(f).get("model_args", {}).items() if k != "num_classes"}
    summary = {"job": "export_backbone", "folder": out_dir, "weights": os.path.join(out_dir, WEIGHTS_FILE),
               "weights_sha256": file_sha256(os.path.join(out_dir, WEIGHTS_FILE)), "architecture": arch,
               "model_args": model_args, "feature_out_indices": out_indices, "untrained": untrained,
               "image_size": size, "source": model_path}
    if program:
        summary["program"] = os.path.join(out_dir, PROGRAM_FILE)
    if verify:
        summary["max_abs_diff"] = feature_difference(model, out_dir, size)
    return summary


def load_exported_features(folder: str, out_indices: Optional[list[int]] = None) -> nn.Module:
    """An exported folder as stock timm's ``features_only`` model (the pyramid levels must-ray used
    unless ``out_indices`` is given), in eval mode: exactly what a user gets."""
    if out_indices is None:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            out_indices = json.load(f)[MUST_RAY_KEY]["feature_out_indices"]
    return timm.create_model(f"local-dir:{os.path.abspath(folder)}", pretrained=True, features_only=True,
                             out_indices=tuple(out_indices)).eval()


def feature_difference(model: MultiTaskModel, folder: str, size: int, batch: int = 2, seed: int = 0) -> float:
    """Largest absolute difference between ``model``'s backbone feature maps and those of the
    exported ``folder`` loaded through stock timm, on a seeded random batch."""
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32))
    exported = load_exported_features(folder)
    with torch.no_grad():
        ours, theirs = model.backbone.eval()(x), exported(x)
    if len(ours) != len(theirs):
        raise ValueError(f"exported backbone has {len(theirs)} feature levels, the model {len(ours)}")
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs))


class Uint8Images(nn.Module):
    """``model`` behind the training preprocessing: uint8 RGB (B, H, W, 3) in, ``{task: raw outputs}`` out."""

    def __init__(self, model: MultiTaskModel):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> dict:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return self.model(x)


def export_program(model: MultiTaskModel, size: int, path: str) -> str:
    """Write ``model`` (all tasks) as a ``torch.export`` program at ``path``: input uint8 images
    (B, ``size``, ``size``, 3), any batch size; output the heads' raw outputs per task (decode them
    with each task's ``predict``). Load with ``torch.export.load(path).module()``."""
    wrapped = Uint8Images(model).eval()
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


__all__ = ["export_backbone", "export_program", "timm_classifier", "plain_names", "load_exported_features",
           "feature_difference", "WEIGHTS_FILE", "CONFIG_FILE", "PROGRAM_FILE"]
