"""What the torchvision kinds share: building ``torchvision.models.get_model(model_name)`` for a
weights file or the hub, and the class names its weights know offline (for ``class_map``)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from must_ray.config import Config
from must_ray.label.teachers.base import Teacher, TeacherSpec
from must_ray.label.teachers.class_map import class_lut
from must_ray.label.teachers.kinds._off_the_shelf import OffTheShelfKind
from must_ray.label.teachers.weights import materialised
from must_ray.tasks import Task, build_task


def load_state(model: torch.nn.Module, weights_path: str) -> None:
    """Load a torchvision weights file (a bare state dict, or one under ``state_dict`` / ``model``)
    into ``model``; auxiliary-classifier weights the model was built without are skipped."""
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = set(model.state_dict())
    model.load_state_dict({k: v for k, v in state.items() if k in own or not k.startswith("aux_classifier.")})


class TorchvisionKind(OffTheShelfKind):
    """A ``torchvision.models`` model whose class 0 is the background: an empty ``class_map`` is
    ``k -> k - 1``, and its default output classes are ours + 1."""

    def model_kwargs(self, input_size: int) -> dict[str, Any]:
        """Extra ``get_model`` keyword arguments this family understands (tried first, then dropped)."""
        return {}

    def adapter(self, name: str, model: torch.nn.Module, task: Task, lut, input_size: Optional[int]) -> Teacher:
        """The runtime teacher that turns the model's outputs into ``task``'s labels."""
        raise NotImplementedError

    @staticmethod
    def class_names(model_name: str, num_model: int, any_size: bool = False) -> list[str]:
        """Category names of the model's torchvision weights with ``num_model`` classes (``any_size``:
        those of its default weights, whatever their count); [] when none are known."""
        try:
            import torchvision

            for w in torchvision.models.get_model_weights(model_name):
                cats = w.meta.get("categories")
                if cats and (any_size or len(cats) == num_model):
                    return list(cats)
        except Exception:  # noqa: BLE001 - names are a convenience only
            return []
        return []

    def create(self, spec: TeacherSpec, num_model: int, input_size: int, weights_path: Optional[str]) -> torch.nn.Module:
        """The model of ``spec`` with ``num_model`` classes, hub or ``weights_path`` weights."""
        import torchvision

        hub = bool(spec.cfg.get("pretrained")) and not weights_path
        kwargs: dict[str, Any] = {"weights": "DEFAULT" if hub else None, "num_classes": num_model}
        if not hub:
            kwargs["weights_backbone"] = None
        attempts = [dict(kwargs, **self.model_kwargs(input_size)), kwargs]
        if hub:
            attempts = [{k: v for k, v in a.items() if k != "num_classes"} for a in attempts]
        last: Optional[Exception] = None
        for kw in attempts:
            try:
                model = torchvision.models.get_model(spec.model_name, **kw)
                break
            except TypeError as exc:  # a model without those keyword arguments
                last = exc
        else:
            raise ValueError(f"cannot build torchvision model {spec.model_name!r}: {last}")
        if weights_path:
            load_state(model, weights_path)
        return model

    def build(self, spec: TeacherSpec, cfg: Config, classes: Sequence[str], image_size: int,
              device: str | torch.device) -> Teacher:
        task_name = spec.tasks[0]
        num_ours = len(classes)
        input_size = spec.cfg.get("input_size")
        num_model = spec.cfg.get("num_classes")
        if not num_model and spec.cfg.get("pretrained") and spec.blob is None:
            num_model = len(self.class_names(spec.model_name, -1, any_size=True)) or None
        num_model = num_model or num_ours + 1
        with materialised(spec.blob, ".pth") as path:
            model = self.create(spec, num_model, input_size or image_size, path)
        lut = class_lut(spec.cfg.get("class_map") or {}, self.class_names(spec.model_name, num_model), num_model,
                        num_ours, f"label.teachers.{task_name}", identity_offset=1)
        task = build_task(task_name, num_ours, cfg.tasks.get(task_name))
        return self.adapter(spec.name, model.to(device).eval(), task, lut, input_size)


__all__ = ["TorchvisionKind", "load_state"]
