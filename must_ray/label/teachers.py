"""Teachers for pseudo-labelling: load any teacher and adapt its raw outputs to task labels.

A *teacher* takes a batch of decoded images — uint8 RGB (B, S, S, 3) at the label resolution,
decoded and resized once for all teachers — and returns, for each task it labels, one label per
image in that task's native form (see ``must_ray/tasks/``), post-processed with the labelling
thresholds of ``cfg.tasks.<task>``. ``Task.encode`` then turns labels into table cells.

Kinds (``label.teachers.<task>.kind``):

``checkpoint``
    a must-ray model file (what the trainer exports; default path
    ``<paths.root>/<paths.teachers>/<task>/model.pt``), through :func:`must_ray.models.load_model`;
    the task's own head and ``Task.predict``. Several tasks naming the same file share one forward.
``random``
    a random-init ``MultiTaskModel`` of the task (``teacher.model`` architecture, ``seed``): for tests
    and dry runs before teachers are trained. The driver builds it once and ships the bytes, so every
    actor labels with the same weights and the provenance hash is the hash of those weights.
``timm``
    a timm classifier by ``model_name``: weights from ``path`` (timm's ``pretrained_cfg_overlay``
    file route) or the hub (``pretrained: true``). Adapter: tempered softmax over the model's
    classes, mass summed into ours through ``class_map`` (identity when empty), top-k.
``torchvision_detector``
    any ``torchvision.models.detection`` model by ``model_name`` (``fasterrcnn_*``, ``retinanet_*``,
    ``fcos_*``) with a weights file. Adapter: model class -> ours through ``class_map`` (identity
    ``k -> k - 1`` when empty, class 0 being torchvision's background), score threshold, class-wise
    NMS, at most ``max_boxes``, boxes normalised.
``torchvision_segmenter``
    any ``torchvision.models.segmentation`` model (``deeplabv3_*``, ``lraspp_*``, ``fcn_*``) with a
    weights file. Adapter: softmax, probabilities summed into background + our categories through
    ``class_map`` (unmapped classes count as background; identity when empty), argmax, pixels whose
    confidence is below ``confidence_threshold`` -> 255 (ignore).

Weights are read once by the driver (:func:`resolve_teachers`), hashed (SHA-256, recorded in the
table's provenance) and shipped to the actors through the object store as bytes, so the hash is
exactly the weights that labelled, workers need no shared filesystem, and a teacher file
overwritten while a job runs cannot mix two models into one table.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from must_ray.config import Config, ConfigError, TaskConfig, TeacherConfig, config_to_dict
from must_ray.models import MultiTaskModel, images_to_tensor, load_model, save_model
from must_ray.models.multitask import IMAGENET_MEAN, IMAGENET_STD
from must_ray.tasks import Task, build_task

OFF_THE_SHELF = ("timm", "torchvision_detector", "torchvision_segmenter")


# ----------------------------------------------------------------------------- specs (driver side)


@dataclass
class TeacherSpec:
    """A resolved teacher: everything an actor needs to build it (plain and picklable), plus what
    the provenance records. ``tasks`` has several entries when checkpoint teachers share a file."""

    tasks: list[str]
    kind: str
    name: str
    path: Optional[str] = None
    model_name: Optional[str] = None
    sha256: Optional[str] = None
    cfg: dict = field(default_factory=dict)  # TeacherConfig as a dict (class_map, num_classes, input_size ...)
    classes: list[str] = field(default_factory=list)  # the checkpoint's own vocabulary (checkpoint kinds)
    blob: Any = None  # the weights: bytes, or a Ray ObjectRef to them (None = hub weights)

    def provenance(self) -> dict[str, Any]:
        out = {"tasks": list(self.tasks), "name": self.name, "kind": self.kind, "path": self.path,
               "sha256": self.sha256}
        if self.model_name:
            out["model_name"] = self.model_name
        if self.kind in OFF_THE_SHELF:
            out.update({k: self.cfg.get(k) for k in ("class_map", "num_classes", "input_size", "pretrained")})
        if self.kind == "random":
            out["seed"] = self.cfg.get("seed", 0)
        return out


def default_teacher_path(cfg: Config, task: str) -> str:
    """Where the trainer exports task ``task``'s teacher: ``<paths.root>/<paths.teachers>/<task>/model.pt``."""
    return os.path.join(cfg.paths.resolve("teachers"), task, "model.pt")


def _read_bytes(path: str) -> bytes:
    """Bytes of a local file or of a URI pyarrow understands (``s3://...``)."""
    if "://" in path and not path.startswith("file://"):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_file(inner) as f:
            return f.read()
    with open(path[7:] if path.startswith("file://") else path, "rb") as f:
        return f.read()


def _exists(path: str) -> bool:
    if "://" in path and not path.startswith("file://"):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        return fs.get_file_info(inner).type == pafs.FileType.File
    return os.path.isfile(path[7:] if path.startswith("file://") else path)


def _load_payload(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def random_teacher_bytes(cfg: Config, task: str, tcfg: TeacherConfig, num_classes: int,
                         classes: Sequence[str], image_size: int) -> bytes:
    """A random-init one-task teacher (``cfg.teacher.model`` architecture, seeded) as the bytes of a
    must-ray model file — the same file format a trained teacher has."""
    from must_ray.tasks import registered_task_names

    seed = int(tcfg.seed) * 1000 + registered_task_names().index(task)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = MultiTaskModel(cfg.teacher.model.backbone, {task: build_task(task, num_classes, cfg.tasks.get(task))},
                               fpn_channels=cfg.teacher.model.fpn_channels)
    finally:
        torch.random.set_rng_state(state)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(os.path.join(tmp, "model.pt"), model.eval(), num_classes=num_classes,
                          task_cfgs={task: cfg.tasks.get(task, TaskConfig())}, classes=list(classes),
                          image_size=image_size, fpn_channels=cfg.teacher.model.fpn_channels,
                          extra={"random_init_seed": seed})
        with open(path, "rb") as f:
            return f.read()


def resolve_teachers(cfg: Config, tasks: Sequence[str], image_size: int) -> tuple[list[TeacherSpec], list[str]]:
    """Check every teacher of ``tasks`` exists and agrees on one class vocabulary, read its weights
    and hash them. Returns ``(specs, classes)``. Fails fast (:class:`ConfigError`) with the task and
    path named when a teacher file is missing."""
    from must_ray.world import CATEGORIES

    payloads: dict[str, tuple[bytes, dict]] = {}
    checkpoint_classes: list[tuple[str, list[str], int]] = []
    paths: dict[str, str] = {}
    for task in tasks:
        tcfg = cfg.label.teachers[task]
        if tcfg.kind != "checkpoint":
            continue
        path = tcfg.path or default_teacher_path(cfg, task)
        paths[task] = path
        if not _exists(path):
            raise ConfigError(
                f"label.teachers.{task}: teacher checkpoint not found: {path} (kind=checkpoint). Train it first "
                f"(jobs/train_teacher.py --task {task}), point --set label.teachers.{task}.path=FILE at a model "
                f"file, or do a dry run with a random-init teacher: --set label.teachers.{task}.kind=random")
        if path not in payloads:
            data = _read_bytes(path)
            try:
                payload = _load_payload(data)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is a config problem here
                raise ConfigError(f"label.teachers.{task}: cannot read {path} as a must-ray model file: {exc}") from None
            if not isinstance(payload, dict) or "state_dict" not in payload or "tasks" not in payload:
                raise ConfigError(f"label.teachers.{task}: {path} is not a must-ray model file")
            payloads[path] = (data, {k: v for k, v in payload.items() if k != "state_dict"})
        info = payloads[path][1]
        if task not in info["tasks"]:
            raise ConfigError(f"label.teachers.{task}: checkpoint {path} has no {task} head (it has {info['tasks']})")
        checkpoint_classes.append((path, list(info.get("classes") or []), int(info["num_classes"])))

    # the class vocabulary: label.classes, else the checkpoints' (they must agree), else the world's
    if cfg.label.classes:
        classes = list(cfg.label.classes)
    else:
        named = [(p, c) for p, c, _ in checkpoint_classes if c]
        classes = list(named[0][1]) if named else list(CATEGORIES)
    for path, names, n in checkpoint_classes:
        if n != len(classes) or (names and names != classes):
            raise ConfigError(
                f"label.teachers: checkpoint {path} predicts {n} classes {names or ''} but the labelling "
                f"vocabulary is {classes}; all teachers must share one vocabulary (set label.classes to "
                f"the right one, or use matching teachers)")

    specs: list[TeacherSpec] = []
    by_path: dict[str, TeacherSpec] = {}
    for task in tasks:
        tcfg = cfg.label.teachers[task]
        tdict = config_to_dict(tcfg)
        if tcfg.kind == "checkpoint":
            path = paths[task]
            if path in by_path:  # one forward for every task of a shared (multi-task) checkpoint
                by_path[path].tasks.append(task)
                by_path[path].name = "+".join(by_path[path].tasks)
                continue
            data, info = payloads[path]
            spec = TeacherSpec([task], "checkpoint", task, path=path, sha256=hashlib.sha256(data).hexdigest(),
                               cfg=tdict, classes=list(info.get("classes") or []), blob=data)
            by_path[path] = spec
            specs.append(spec)
        elif tcfg.kind == "random":
            data = random_teacher_bytes(cfg, task, tcfg, len(classes), classes, image_size)
            specs.append(TeacherSpec([task], "random", f"random-{task}", sha256=hashlib.sha256(data).hexdigest(),
                                     cfg=tdict, classes=list(classes), blob=data))
        else:
            expected = {"timm": ("classification",), "torchvision_detector": ("detection",),
                        "torchvision_segmenter": ("segmentation",)}[tcfg.kind]
            if task not in expected:
                raise ConfigError(f"label.teachers.{task}: kind={tcfg.kind!r} labels {expected[0]}, not {task}")
            data = None
            sha = None
            if tcfg.path:
                if not _exists(tcfg.path):
                    raise ConfigError(f"label.teachers.{task}: weights file not found: {tcfg.path}")
                data = _read_bytes(tcfg.path)
                sha = hashlib.sha256(data).hexdigest()
            specs.append(TeacherSpec([task], tcfg.kind, f"{tcfg.kind}:{tcfg.model_name}", path=tcfg.path,
                                     model_name=tcfg.model_name, sha256=sha, cfg=tdict, blob=data))
    return specs, classes


# ----------------------------------------------------------------------------- runtime teachers


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), ``(x / 255 - mean) / std``."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def _resample(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Teacher:
    """Runtime teacher: ``predict(images uint8 (B, S, S, 3) tensor on the device)`` -> ``{task: labels}``."""

    name: str = ""
    tasks: list[str] = []

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        raise NotImplementedError


class MustTeacher(Teacher):
    """One of our own models (``checkpoint`` / ``random``): shared forward, each task's ``predict``.

    ``channels_last`` (default): weights and inputs in NHWC memory format, which oneDNN's CPU
    convolutions (and cuDNN's) run faster; measured 40 % less CPU time per image for the five demo
    teachers at 64 px (``jobs/benchmark.py flops``, docs/benchmarks.md). Same results up to float
    rounding."""

    def __init__(self, name: str, model: MultiTaskModel, tasks: dict[str, Task], input_size: Optional[int] = None,
                 channels_last: bool = True):
        self.name = name
        self.channels_last = channels_last
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.task_objs = tasks
        self.tasks = list(tasks)
        self.input_size = input_size

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        size = tuple(images.shape[1:3])
        x = _resample(images_to_tensor(images, images.device), self.input_size)  # the training preprocessing
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.model(x, tasks=self.tasks)
        return {t: self.task_objs[t].predict(out[t], size) for t in self.tasks}


def _model_class(key: str, names: Sequence[str], num_model: int, what: str) -> int:
    """A ``class_map`` key -> the model's class id: an id written as text (``"3"``) or a class name
    the model's library knows (case-insensitive)."""
    text = str(key).strip()
    if text.lstrip("-").isdigit():
        idx = int(text)
    else:
        lower = {n.lower(): i for i, n in enumerate(names)}
        if text.lower() not in lower:
            hint = f" (known names: {', '.join(list(names)[:12])} ...)" if names else " (no class names known for this model)"
            raise ValueError(f"{what}: class_map key {key!r} is neither a class id nor a known class name{hint}")
        idx = lower[text.lower()]
    if not 0 <= idx < num_model:
        raise ValueError(f"{what}: class_map key {key!r} is model class {idx}, outside [0, {num_model})")
    return idx


def _mapping(class_map: dict[str, int], names: Sequence[str], num_model: int, num_ours: int, what: str,
             identity_offset: int = 0) -> np.ndarray:
    """A lookup table ``model class -> our class id`` (-1 = unmapped). An empty ``class_map`` is the
    identity shifted by ``identity_offset`` (``k -> k - offset``; torchvision's class 0 is background)."""
    lut = np.full(num_model, -1, dtype=np.int64)
    if not class_map:
        for k in range(num_model):
            if 0 <= k - identity_offset < num_ours:
                lut[k] = k - identity_offset
        return lut
    for key, ours in class_map.items():
        if not 0 <= ours < num_ours:
            raise ValueError(f"{what}: class_map.{key} -> {ours}, but the vocabulary has {num_ours} classes")
        lut[_model_class(key, names, num_model, what)] = ours
    return lut


class TimmClassifierTeacher(Teacher):
    """timm classifier -> classification labels (tempered softmax, mass mapped into our classes, top-k)."""

    def __init__(self, name: str, model: torch.nn.Module, task: Task, lut: np.ndarray,
                 mean: Sequence[float], std: Sequence[float], input_size: Optional[int]):
        self.name, self.model, self.task = name, model, task
        self.tasks = [task.name]
        self.mean, self.std, self.input_size = mean, std, input_size
        num_ours = task.num_classes
        m = torch.zeros(len(lut), num_ours)
        for k, ours in enumerate(lut):
            if ours >= 0:
                m[k, ours] = 1.0
        self.agg = m

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        from must_ray.tasks.classification import make_label

        x = _resample(_normalise(images, self.mean, self.std), self.input_size)
        logits = self.model(x).float()
        probs = F.softmax(logits / self.task.cfg.temperature, dim=1).cpu() @ self.agg  # (B, C) mapped mass
        k = min(int(self.task.cfg.topk), probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1, largest=True, sorted=True)
        return {self.task.name: [make_label(int(i[0]), i.numpy(), p.numpy()) for i, p in zip(top_i, top_p)]}


class TorchvisionDetectorTeacher(Teacher):
    """torchvision detector -> detection labels (class mapping, score threshold, class-wise NMS,
    ``max_boxes``, boxes normalised to [0, 1])."""

    def __init__(self, name: str, model: torch.nn.Module, task: Task, lut: np.ndarray, input_size: Optional[int]):
        self.name, self.model, self.task = name, model, task
        self.tasks = [task.name]
        self.lut = torch.as_tensor(lut)
        self.input_size = input_size

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        from torchvision.ops import batched_nms

        from must_ray.tasks.detection import make_label

        x = _resample(images.permute(0, 3, 1, 2).float().div_(255.0), self.input_size)
        h, w = x.shape[-2:]
        outputs = self.model(list(x))
        cfg = self.task.cfg
        labels = []
        for out in outputs:
            boxes = out["boxes"].detach().float().cpu()
            scores = out["scores"].detach().float().cpu()
            cls = out["labels"].detach().cpu().long()
            valid = (cls >= 0) & (cls < len(self.lut))
            ours = torch.full_like(cls, -1)
            ours[valid] = self.lut[cls[valid]]
            keep = (ours >= 0) & (scores >= cfg.score_threshold)
            boxes, scores, ours = boxes[keep], scores[keep], ours[keep]
            scale = torch.tensor([w, h, w, h], dtype=boxes.dtype)
            boxes = (boxes / scale).clamp(0.0, 1.0)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, ours = boxes[keep], scores[keep], ours[keep]
            order = batched_nms(boxes, scores, ours, float(cfg.nms_iou))[: int(cfg.max_boxes)]
            labels.append(make_label(boxes[order].numpy(), ours[order].numpy(), scores[order].numpy()))
        return {self.task.name: labels}


class TorchvisionSegmenterTeacher(Teacher):
    """torchvision segmenter -> segmentation labels (probabilities summed into background + our
    categories, argmax, low confidence -> 255)."""

    def __init__(self, name: str, model: torch.nn.Module, task: Task, lut: np.ndarray, input_size: Optional[int]):
        self.name, self.model, self.task = name, model, task
        self.tasks = [task.name]
        self.input_size = input_size
        num_ours = task.num_classes + 1  # our segmentation labels: 0 background, c + 1 category c
        m = torch.zeros(len(lut), num_ours)
        for k, ours in enumerate(lut):
            m[k, ours + 1 if ours >= 0 else 0] = 1.0  # unmapped model classes are background for us
        self.agg = m

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        from must_ray.tasks.segmentation import IGNORE

        size = tuple(images.shape[1:3])
        x = _resample(_normalise(images, IMAGENET_MEAN, IMAGENET_STD), self.input_size)
        logits = self.model(x)["out"].float()
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        probs = torch.einsum("bkhw,kc->bchw", F.softmax(logits, dim=1), self.agg.to(logits.device)).cpu()
        conf, cls = probs.max(dim=1)
        cls = cls.to(torch.uint8)
        thr = float(self.task.cfg.confidence_threshold)
        if thr > 0:
            cls[conf < thr] = IGNORE
        return {self.task.name: [m.numpy() for m in cls]}


def _materialise(blob: Any, suffix: str) -> tuple[Optional[str], Optional[str]]:
    """Write shipped weights to a private temp file: ``(path, tmp_dir)`` (``(None, None)`` = hub)."""
    if blob is None:
        return None, None
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        import ray

        blob = ray.get(blob)
    tmp = tempfile.mkdtemp(prefix="must-ray-teacher-")
    path = os.path.join(tmp, "weights" + suffix)
    with open(path, "wb") as f:
        f.write(blob)
    return path, tmp


def _model_class_names(kind: str, model_name: str, num_model: int, any_size: bool = False) -> list[str]:
    """Class names of an off-the-shelf model, when its library knows them offline (``any_size``:
    those of its default weights, whatever their count)."""
    try:
        if kind == "timm":
            if num_model == 1000:
                from timm.data import ImageNetInfo

                info = ImageNetInfo()
                return [d.split(",")[0].strip() for d in info.label_descriptions()]
            return []
        import torchvision

        weights = torchvision.models.get_model_weights(model_name)
        for w in weights:
            cats = w.meta.get("categories")
            if cats and (any_size or len(cats) == num_model):
                return list(cats)
    except Exception:  # noqa: BLE001 - names are a convenience only
        return []
    return []


def _torchvision_model(spec: TeacherSpec, num_model: int, input_size: int, weights_path: Optional[str]) -> torch.nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {"weights": "DEFAULT" if (spec.cfg.get("pretrained") and not weights_path) else None,
                              "num_classes": num_model}
    if kwargs["weights"] is None:
        kwargs["weights_backbone"] = None
    if spec.kind == "torchvision_detector":
        attempts = [dict(kwargs, min_size=input_size, max_size=input_size), kwargs]
    else:
        attempts = [dict(kwargs, aux_loss=False), kwargs]
    if kwargs["weights"] == "DEFAULT":
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
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        own = set(model.state_dict())
        state = {k: v for k, v in state.items() if k in own or not k.startswith("aux_classifier.")}
        model.load_state_dict(state)
    return model


def build_teacher(spec: TeacherSpec, cfg: Config, classes: Sequence[str], image_size: int,
                  device: str | torch.device = "cpu") -> Teacher:
    """Instantiate one resolved teacher on ``device`` (eval mode, thresholds from ``cfg.tasks``)."""
    num_ours = len(classes)
    input_size = spec.cfg.get("input_size")
    if spec.kind in ("checkpoint", "random"):
        path, tmp = _materialise(spec.blob, ".pt") if spec.blob is not None else (spec.path, None)
        try:
            overrides = {t: cfg.tasks.get(t, TaskConfig()) for t in spec.tasks}
            model, info = load_model(path, map_location="cpu", task_overrides=overrides)
        finally:
            if tmp:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        model = model.to(device).eval()
        return MustTeacher(spec.name, model, {t: info["tasks"][t] for t in spec.tasks}, input_size)

    task_name = spec.tasks[0]
    task = build_task(task_name, num_ours, cfg.tasks.get(task_name))
    if spec.kind == "timm":
        import timm

        num_model = spec.cfg.get("num_classes")
        path, tmp = _materialise(spec.blob, os.path.splitext(spec.path or "")[1] or ".pth")
        try:
            if path:  # a weights file: a classifier over `num_classes` (default: ours)
                num_model = num_model or num_ours
                model = timm.create_model(spec.model_name, pretrained=True, num_classes=num_model,
                                          pretrained_cfg_overlay=dict(file=path, num_classes=num_model))
            else:  # hub weights: the model's own classifier unless num_classes is given
                kwargs = {"num_classes": num_model} if num_model else {}
                model = timm.create_model(spec.model_name, pretrained=bool(spec.cfg.get("pretrained")), **kwargs)
                num_model = int(model.num_classes)
        finally:
            if tmp:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = pcfg.get("mean", IMAGENET_MEAN), pcfg.get("std", IMAGENET_STD)
        names = _model_class_names("timm", spec.model_name, num_model)
        lut = _mapping(spec.cfg.get("class_map") or {}, names, num_model, num_ours, f"label.teachers.{task_name}")
        return TimmClassifierTeacher(spec.name, model.to(device).eval(), task, lut, mean, std, input_size)

    # torchvision: detection has a background class 0, hence "+1" by default; hub weights: their classes
    num_model = spec.cfg.get("num_classes")
    if not num_model and spec.cfg.get("pretrained") and spec.blob is None:
        num_model = len(_model_class_names(spec.kind, spec.model_name, -1, any_size=True)) or None
    num_model = num_model or num_ours + 1
    path, tmp = _materialise(spec.blob, ".pth")
    try:
        model = _torchvision_model(spec, num_model, input_size or image_size, path)
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    names = _model_class_names(spec.kind, spec.model_name, num_model)
    lut = _mapping(spec.cfg.get("class_map") or {}, names, num_model, num_ours, f"label.teachers.{task_name}",
                   identity_offset=1)
    model = model.to(device).eval()
    if spec.kind == "torchvision_detector":
        return TorchvisionDetectorTeacher(spec.name, model, task, lut, input_size)
    return TorchvisionSegmenterTeacher(spec.name, model, task, lut, input_size)


class TeacherSet:
    """All teachers of a labelling run, built once per actor (or once by the plain loop).
    :meth:`predict` runs every teacher on the same decoded batch."""

    def __init__(self, specs: Sequence[TeacherSpec], cfg: Config, classes: Sequence[str], image_size: int,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.teachers = [build_teacher(s, cfg, classes, image_size, self.device) for s in specs]
        self.tasks = [t for teacher in self.teachers for t in teacher.tasks]

    def predict(self, images: np.ndarray, timings: Optional[dict[str, float]] = None) -> dict[str, list[Any]]:
        """``images`` uint8 (B, S, S, 3) -> ``{task: [label] * B}``; per-teacher seconds are added
        to ``timings`` (keyed by teacher name) when given."""
        import time

        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        out: dict[str, list[Any]] = {}
        with torch.inference_mode():
            for teacher in self.teachers:
                t0 = time.perf_counter()
                out.update(teacher.predict(x))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if timings is not None:
                    timings[teacher.name] = timings.get(teacher.name, 0.0) + time.perf_counter() - t0
        return out


__all__ = ["TeacherSpec", "Teacher", "TeacherSet", "MustTeacher", "TimmClassifierTeacher",
           "TorchvisionDetectorTeacher", "TorchvisionSegmenterTeacher", "resolve_teachers", "build_teacher",
           "default_teacher_path", "random_teacher_bytes", "OFF_THE_SHELF"]
