"""Typed configuration: dataclasses loaded from YAML, ``--set`` overrides, fail-fast validation.

Every job reads one :class:`Config` (``jobs/configs/*.yaml``). Unknown keys, wrong types and
bad values raise :class:`ConfigError` naming the dotted key *before* any work starts.
Sections that a job does not use are still validated, so a typo anywhere is caught early.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from must_ray.io import is_uri
from must_ray.task_registry import (
    TaskConfigs,
    default_task_configs,
    default_task_names,
    load_task_modules,
    probe_task_names,
    registered_task_names,
)
from must_ray.typed_config import (
    ConfigError,
    build_dataclass,
    coerce_value,
    config_to_dict,
    deep_merge,
    validate_tree,
)

# ----------------------------------------------------------------------------- sections


@dataclass
class PathsConfig:
    """Where a pipeline run writes. ``root`` relocates every output; the others are relative to it
    unless absolute (or a URI such as ``s3://bucket/x``)."""

    root: str = "out"
    world: str = "world"
    teachers: str = "teachers"
    labels: str = "labels"
    student: str = "student"
    reports: str = "reports"

    def resolve(self, name: str) -> str:
        """The full location of output ``name`` (``world``, ``teachers`` ...) under ``root``."""
        value = getattr(self, name)
        if is_uri(value) or os.path.isabs(value):
            return value
        return os.path.join(self.root, value)


@dataclass
class SplitConfig:
    """One named split of the synthetic world."""

    num: int = 64
    seed_offset: int = 0
    tasks: list[str] = field(default_factory=list)  # ground-truth task columns to keep ([] = image only)
    domain: Literal["default", "dim", "bright", "cluttered"] = "default"

    def validate(self, key: str) -> None:
        if self.num < 0:
            raise ConfigError(f"{key}.num must be >= 0, got {self.num}")
        for t in self.tasks:
            if t not in _known_tasks():
                raise ConfigError(f"{key}.tasks: unknown task {t!r}; known: {', '.join(_known_tasks())}")


def _default_splits() -> dict[str, SplitConfig]:
    names = default_task_names()
    splits = {f"teacher_{t}": SplitConfig(num=256, seed_offset=1000 * (i + 1), tasks=[t]) for i, t in enumerate(names)}
    splits["unlabeled"] = SplitConfig(num=1024, seed_offset=100_000, tasks=[])
    splits["test"] = SplitConfig(num=128, seed_offset=900_000, tasks=list(names))
    return splits


@dataclass
class WorldConfig:
    """The embedded synthetic multi-task world (see ``must_ray.world``)."""

    seed: int = 0
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 5
    splits: dict[str, SplitConfig] = field(default_factory=_default_splits)
    render_batch: int = 32  # scenes rendered together (vectorised) per Ray Data batch
    rows_per_file: int = 512

    def validate(self, key: str) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"{key}.image_size must be in [16, 1024], got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 16:
            raise ConfigError(
                f"{key}.min_objects/max_objects must satisfy 1 <= min <= max <= 16, "
                f"got {self.min_objects}/{self.max_objects}"
            )
        if self.render_batch < 1:
            raise ConfigError(f"{key}.render_batch must be >= 1, got {self.render_batch}")
        if self.rows_per_file < 1:
            raise ConfigError(f"{key}.rows_per_file must be >= 1, got {self.rows_per_file}")
        for name, split in self.splits.items():
            split.validate(f"{key}.splits.{name}")


@dataclass
class ModelConfig:
    """A ``MultiTaskModel``: timm backbone + FPN neck + one head per task."""

    backbone: str = "test_resnet"  # any timm model name that supports features_only
    fpn_channels: int = 64
    pretrained: bool = False  # timm hub weights (needs internet) unless backbone_weights is set
    backbone_weights: Optional[str] = None  # a local timm/PyTorch weights file for the backbone
    init_checkpoint: Optional[str] = None  # start from an exported must-ray model (matching parts load)

    def validate(self, key: str) -> None:
        if self.fpn_channels < 8:
            raise ConfigError(f"{key}.fpn_channels must be >= 8, got {self.fpn_channels}")
        if not self.backbone:
            raise ConfigError(f"{key}.backbone must name a timm model")


@dataclass
class OptimizerConfig:
    """AdamW (decay on conv/linear weights only) and gradient clipping."""

    lr: float = 2e-3  # peak learning rate at the run's global_batch_size
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # max global grad norm; 0 = off

    def validate(self, key: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr must be > 0, got {self.lr}")


@dataclass
class ScheduleConfig:
    """How long a run trains and the LR curve: linear warm-up, then cosine to 1% of the peak."""

    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimiser steps (overrides epochs)
    warmup_steps: int = 30

    def validate(self, key: str) -> None:
        if self.epochs < 1:
            raise ConfigError(f"{key}.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{key}.max_steps must be >= 1 or null, got {self.max_steps}")


@dataclass
class LossConfig:
    """How the per-task losses add up: fixed weights, or learned ones (uncertainty, Kendall et al.),
    optionally with teacher dropping (UNIC)."""

    weighting: Literal["fixed", "uncertainty"] = "fixed"
    weights: dict[str, float] = field(default_factory=dict)  # this run's task weights (default tasks.<t>.loss_weight)
    # teacher dropping (UNIC): per image, every task but the one with the highest weighted loss has
    # its label dropped with this probability; 0 = off
    teacher_drop_p: float = 0.0

    def validate(self, key: str) -> None:
        if not 0.0 <= self.teacher_drop_p < 1.0:
            raise ConfigError(f"{key}.teacher_drop_p must be in [0, 1) (0 = off), got {self.teacher_drop_p}")
        for t, w in self.weights.items():
            if t not in _known_tasks():
                raise ConfigError(f"{key}.weights.{t}: unknown task; known: {', '.join(_known_tasks())}")
            if w < 0:
                raise ConfigError(f"{key}.weights.{t} must be >= 0, got {w}")


@dataclass
class InputConfig:
    """The input pipeline: resolution, augmentation, and the Ray Data read / cache / shuffle / prefetch."""

    image_size: Optional[int] = None  # training/export resolution (square); None = world.image_size
    augment: bool = True  # random resized crop + flip, applied to the image and every label
    crop_scale_min: float = 0.6  # random crop keeps at least this fraction of the image area
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0 = off)
    prefetch_batches: int = 2  # batches fetched (and with collate=prefetch, collated) ahead by Ray Data's threads
    # where each batch is decoded and augmented: "prefetch" in Ray Data's background threads
    # (overlapped with the step), "step" in the training thread (no thread competing with torch's
    # intra-op threads); auto = step on a CPU worker with more than one torch thread, else prefetch
    collate: Literal["auto", "step", "prefetch"] = "auto"
    read_cpus: float = 0.25  # logical CPUs each Ray Data read task reserves (fractional: never starved)
    cache_max_mb: int = 1024  # tables up to this size (and 1/4 of the object store) are held in memory across epochs

    def validate(self, key: str) -> None:
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise ConfigError(f"{key}.image_size must be in [16, 1024] or null, got {self.image_size}")
        if not 0.05 <= self.crop_scale_min <= 1.0:
            raise ConfigError(f"{key}.crop_scale_min must be in [0.05, 1], got {self.crop_scale_min}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"{key}.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if not 0 <= self.prefetch_batches <= 16:
            raise ConfigError(f"{key}.prefetch_batches must be in [0, 16], got {self.prefetch_batches}")
        if self.cache_max_mb < 0:
            raise ConfigError(f"{key}.cache_max_mb must be >= 0, got {self.cache_max_mb}")
        if not 0 <= self.read_cpus <= 64:
            raise ConfigError(f"{key}.read_cpus must be in [0, 64], got {self.read_cpus}")


@dataclass
class ScalingConfig:
    """The worker group (``ray.train.ScalingConfig``): ``[min, max]`` workers, elastic when min < max."""

    num_workers: list[int] = field(default_factory=lambda: [1, 1])
    use_gpu: bool = False  # one GPU per worker: NCCL, bf16 autocast
    cpus_per_worker: float = 1.0  # leave >= input.read_cpus free for the Ray Data readers
    resize_interval_s: float = 60.0  # elastic: how often a healthy group checks for room to grow (a resize restarts it)
    start_timeout_s: float = 10.0  # a group not placed in this long is retried, sized to the nodes alive then
    poll_interval_s: float = 1.0  # Ray Train's controller polls the workers: finds a dead one, registers reports

    def validate(self, key: str) -> None:
        if len(self.num_workers) != 2 or not 1 <= self.num_workers[0] <= self.num_workers[1]:
            raise ConfigError(f"{key}.num_workers must be [min, max] with 1 <= min <= max, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"{key}.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        for name in ("resize_interval_s", "start_timeout_s", "poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name} must be > 0 seconds, got {getattr(self, name)}")


@dataclass
class CheckpointConfig:
    """A run's identity and fault tolerance (``ray.train.RunConfig``): where its checkpoints live,
    how often rank 0 writes one, how many are kept, how many restarts are allowed. Re-submitting
    the same ``run_name`` under the same ``storage_path`` resumes the run."""

    every_steps: int = 100
    num_to_keep: int = 2
    max_failures: int = 3  # worker-group restarts allowed (-1 = forever)
    run_name: Optional[str] = None  # Ray Train run name; None = <name>-teacher-<task> / <name>-student
    storage_path: Optional[str] = None  # Ray Train storage; None = <--out>/ray_train (absolute)

    def validate(self, key: str) -> None:
        for name in ("every_steps", "num_to_keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise ConfigError(f"{key}.max_failures must be >= -1 (-1 = retry forever), got {self.max_failures}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name):
            raise ConfigError(f"{key}.run_name must be a non-empty name without '/', got {self.run_name!r}")


@dataclass
class TrainConfig:
    """One Ray Train run (a teacher or the student), grouped by component (docs/training.md):
    what it trains on and the model at the top, then the optimiser, schedule, loss, input
    pipeline, worker group and checkpoints."""

    data: list[str] = field(default_factory=list)  # examples tables; [] = the pipeline's default for the role
    tasks: list[str] = field(default_factory=list)  # [] = every task with labels in the data
    model: ModelConfig = field(default_factory=ModelConfig)
    global_batch_size: int = 64  # images per optimiser step over all workers (optimizer.lr is for this batch)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema_decay: float = 0.0  # EMA of the weights (the export holds them); 0 = off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on GPU and native-bf16 CPUs, else fp32
    channels_last: bool = True
    input: InputConfig = field(default_factory=InputConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    report_every_steps: int = 10
    seed: int = 0  # init, crops, shuffles
    # teachers only: how many teacher runs the pipeline trains at once (each its own Ray Train run of
    # scaling.num_workers workers; the cluster must hold them side by side). The student is one run: 1.
    concurrent_runs: int = 1
    # teachers only: per-task changes to the keys above, e.g. {classification: {schedule: {max_steps: 3000}}}
    # (each teacher has its own recipe, as in the paper); see :func:`teacher_config`
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        if self.per_task and not key.endswith("teacher"):
            raise ConfigError(f"{key}.per_task: only teachers have per-task settings")
        for task, changes in self.per_task.items():
            if task not in _known_tasks():
                raise ConfigError(f"{key}.per_task.{task}: unknown task; known: {', '.join(_known_tasks())}")
            if "per_task" in changes or "concurrent_runs" in changes:
                raise ConfigError(f"{key}.per_task.{task}: per_task/concurrent_runs apply to all teachers")
            validate_tree(_train_config_for(self, changes, f"{key}.per_task.{task}"), f"{key}.per_task.{task}")
        if self.concurrent_runs < 1 or (key.endswith("student") and self.concurrent_runs != 1):
            raise ConfigError(f"{key}.concurrent_runs must be >= 1 (teachers) or 1 (the student is one run), "
                              f"got {self.concurrent_runs}")
        for name in ("global_batch_size", "report_every_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(self, name)}")
        workers = self.scaling.num_workers
        if len(workers) == 2 and self.global_batch_size < workers[1]:
            raise ConfigError(f"{key}.global_batch_size ({self.global_batch_size}) must be >= the max number of "
                              f"workers ({key}.scaling.num_workers {workers})")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{key}.ema_decay must be in [0, 1), got {self.ema_decay}")
        for t in self.tasks:
            if t not in _known_tasks():
                raise ConfigError(f"{key}.tasks: unknown task {t!r}; known: {', '.join(_known_tasks())}")


@dataclass
class TeacherConfig:
    """Where one task's teacher comes from when labelling."""

    kind: Literal["checkpoint", "timm", "torchvision_detector", "torchvision_segmenter", "backbone",
                  "random"] = "checkpoint"
    path: Optional[str] = None  # checkpoint / weights file; default for kind=checkpoint: the trained teacher
    model_name: Optional[str] = None  # timm / torchvision model name for off-the-shelf kinds (and a timm backbone)
    class_map: dict[str, int] = field(default_factory=dict)  # off-the-shelf class name/id -> our class id
    pretrained: bool = False  # off-the-shelf kinds without `path`: the hub's weights (needs internet)
    num_classes: Optional[int] = None  # off-the-shelf model's output classes; None = ours (+1 background)
    input_size: Optional[int] = None  # teacher's input side (the decoded batch is resampled); None = label size
    seed: int = 0  # kind=random: init seed (every actor builds the same weights)

    def validate(self, key: str) -> None:
        if self.kind == "backbone" and not (self.path or self.model_name):
            raise ConfigError(f"{key}: kind='backbone' needs a must-ray model file ({key}.path) or a timm "
                              f"backbone ({key}.model_name, with a weights file {key}.path or {key}.pretrained=true)")
        if self.kind == "backbone" and self.model_name and not (self.path or self.pretrained):
            raise ConfigError(f"{key}: kind='backbone' with model_name={self.model_name!r} needs a weights file "
                              f"({key}.path) or {key}.pretrained=true")
        if self.kind in ("timm", "torchvision_detector", "torchvision_segmenter") and not self.model_name:
            raise ConfigError(f"{key}.model_name is required for kind={self.kind!r}")
        if self.kind in ("timm", "torchvision_detector", "torchvision_segmenter") and not (self.path or self.pretrained):
            raise ConfigError(f"{key}: kind={self.kind!r} needs a weights file ({key}.path) or {key}.pretrained=true")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"{key}.num_classes must be >= 1 or null, got {self.num_classes}")
        if self.input_size is not None and not 16 <= self.input_size <= 4096:
            raise ConfigError(f"{key}.input_size must be in [16, 4096] or null, got {self.input_size}")
        for name, ours in self.class_map.items():
            if ours < 0:
                raise ConfigError(f"{key}.class_map.{name} must be a class id >= 0, got {ours}")


def _default_teachers() -> dict[str, TeacherConfig]:
    return {t: TeacherConfig() for t in default_task_names()}


@dataclass
class LabelConfig:
    """Pseudo-labelling with Ray Data: inputs, teacher actors, output."""

    input: Optional[str] = None  # folder/glob/URI of images or a Parquet table; None = the world's unlabeled split
    output: Optional[str] = None  # None = <paths.root>/<paths.labels>
    teachers: dict[str, TeacherConfig] = field(default_factory=_default_teachers)
    image_size: Optional[int] = None  # decode+resize once to this size for all teachers; None = world.image_size
    batch_size: int = 64
    actors: list[int] = field(default_factory=lambda: [1, 1])  # ActorPoolStrategy [min_size, max_size]
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # teachers' forward; auto = bf16 on GPU / native-bf16 CPU
    max_image_pixels: int = 50_000_000  # larger images are quarantined (decompression bombs)
    tasks: list[str] = field(default_factory=list)  # tasks to label; [] = every task in label.teachers
    shard_size: int = 256  # images per shard: the unit of one actor call and of one atomic commit
    shard_bytes: int = 128 * 1024 * 1024  # fewer images per shard when a part file would grow larger (estimate)
    files_per_dir: int = 10_000  # a plan of more shards spreads its part files over sub-directories of this many
    plan_piece_rows: int = 1 << 18  # input ids per plan piece (one Ray task writes one piece)
    decode_num_cpus: float = 1.0  # CPUs each read/decode task reserves (fractional is fine)
    torch_threads: int = 0  # intra-op threads per actor; 0 = max(1, round(num_cpus_per_actor))
    encode_threads: int = 1  # threads per actor PNG-encoding batch i while the teachers run batch i+1 (0 = inline)
    max_file_bytes: int = 256 * 1024 * 1024  # bigger files are quarantined unread
    extensions: list[str] = field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"])
    classes: list[str] = field(default_factory=list)  # class vocabulary; [] = the checkpoints', else the world's
    overwrite: bool = False  # delete an existing output first instead of resuming it

    def validate(self, key: str) -> None:
        if len(self.actors) != 2 or not 1 <= self.actors[0] <= self.actors[1]:
            raise ConfigError(f"{key}.actors must be [min, max] with 1 <= min <= max, got {self.actors}")
        if self.shard_size < 1:
            raise ConfigError(f"{key}.shard_size must be >= 1, got {self.shard_size}")
        for name in ("shard_bytes", "files_per_dir", "plan_piece_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_num_cpus < 0:
            raise ConfigError(f"{key}.decode_num_cpus must be >= 0, got {self.decode_num_cpus}")
        if self.torch_threads < 0:
            raise ConfigError(f"{key}.torch_threads must be >= 0 (0 = auto), got {self.torch_threads}")
        if self.encode_threads < 0:
            raise ConfigError(f"{key}.encode_threads must be >= 0 (0 = inline), got {self.encode_threads}")
        if self.max_file_bytes < 1:
            raise ConfigError(f"{key}.max_file_bytes must be >= 1, got {self.max_file_bytes}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"{key}.classes has duplicate names: {self.classes}")
        for t in self.tasks:
            if t not in self.teachers:
                raise ConfigError(f"{key}.tasks: {t!r} has no teacher in {key}.teachers "
                                  f"(known tasks: {', '.join(_known_tasks())})")
        if self.batch_size < 1:
            raise ConfigError(f"{key}.batch_size must be >= 1, got {self.batch_size}")
        if self.image_size is not None and not 16 <= self.image_size <= 4096:
            raise ConfigError(f"{key}.image_size must be in [16, 4096], got {self.image_size}")
        if self.num_cpus_per_actor < 0 or self.num_gpus_per_actor < 0:
            raise ConfigError(f"{key}.num_cpus_per_actor/num_gpus_per_actor must be >= 0")
        if self.max_image_pixels < 1:
            raise ConfigError(f"{key}.max_image_pixels must be >= 1, got {self.max_image_pixels}")
        for t in self.teachers:
            if t not in _known_tasks():
                raise ConfigError(f"{key}.teachers.{t}: unknown task; known: {', '.join(_known_tasks())}")


@dataclass
class EvalConfig:
    """Evaluation (``jobs/evaluate.py``, ``must_ray.evaluate.scoring``) and the report pictures."""

    data: list[str] = field(default_factory=list)  # examples tables; [] = <paths.root>/<paths.world>/test
    tasks: list[str] = field(default_factory=list)  # [] = every task the model has a head and the data labels for
    batch_size: int = 64
    use_ray: bool = True  # False: score in the driver process (small tables, debugging)
    actors: Optional[list[int]] = None  # ActorPoolStrategy [min, max]; None = 1..what the cluster holds
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    read_cpus: float = 0.25  # logical CPUs each Ray Data read task reserves
    trivial_fit_rows: int = 4096  # labelled rows the trivial baseline is fitted on (per task)
    tolerance: float = 0.02  # MuST pass: student >= (1-tol) x teacher (higher better), <= (1+tol) x (lower)
    grid_images: int = 6  # rows of the report's picture grid
    grid_scale: int = 3  # nearest-neighbour upscaling of the grid's images

    def validate(self, key: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{key}.batch_size must be >= 1, got {self.batch_size}")
        if self.actors is not None and (len(self.actors) != 2 or not 1 <= self.actors[0] <= self.actors[1]):
            raise ConfigError(f"{key}.actors must be null or [min, max] with 1 <= min <= max, got {self.actors}")
        if self.num_cpus_per_actor < 0 or self.num_gpus_per_actor < 0 or self.read_cpus < 0:
            raise ConfigError(f"{key}.num_cpus_per_actor/num_gpus_per_actor/read_cpus must be >= 0")
        if self.trivial_fit_rows < 1:
            raise ConfigError(f"{key}.trivial_fit_rows must be >= 1, got {self.trivial_fit_rows}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"{key}.tolerance must be in [0, 1), got {self.tolerance}")
        if self.grid_images < 1 or not 1 <= self.grid_scale <= 16:
            raise ConfigError(f"{key}.grid_images must be >= 1 and grid_scale in [1, 16], "
                              f"got {self.grid_images}/{self.grid_scale}")
        for t in self.tasks:
            if t not in _known_tasks():
                raise ConfigError(f"{key}.tasks: unknown task {t!r}; known: {', '.join(_known_tasks())}")


@dataclass
class TransferConfig:
    """Transfer evaluation (``must_ray.evaluate.transfer``): frozen backbones, light probes fitted on a small
    labelled split of a domain no model trained on, scored on a held-out split of it."""

    domain: Literal["default", "dim", "bright", "cluttered"] = "cluttered"
    tasks: list[str] = field(default_factory=lambda: list(probe_task_names()))  # tasks with a light probe
    train_num: int = 256  # scenes of the transfer_train split (probe fitting)
    test_num: int = 128  # scenes of the transfer_test split (scoring)
    seed_offset: int = 700_000  # transfer_train scenes start here; transfer_test 50_000 later
    train_data: Optional[str] = None  # an examples table to fit on instead of the world split
    test_data: Optional[str] = None  # an examples table to score on instead of the world split
    features: Literal["backbone", "fpn"] = "backbone"  # probe the backbone maps, or backbone + FPN neck
    pixels_per_image: int = 64  # random valid pixels per image the dense probes are fitted on
    ridge: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])  # strengths tried
    val_fraction: float = 0.25  # train images held out to pick the ridge strength
    random_backbone: bool = True  # add a random-init row (same architecture) to the table
    seed: int = 0
    batch_size: int = 64  # feature-extraction batch
    # rows of backbones already probed here (same model bytes, settings and tables) are reused:
    # experiments probe their shared teachers once; None = off
    cache_dir: Optional[str] = None

    def validate(self, key: str) -> None:
        for t in self.tasks:
            if t not in _known_tasks():
                raise ConfigError(f"{key}.tasks: unknown task {t!r}; known: {', '.join(_known_tasks())}")
            if t not in probe_task_names():
                raise ConfigError(f"{key}.tasks: {t} has no light probe; use {', '.join(probe_task_names())}")
        if not 4 <= self.train_num <= 50_000 or self.test_num < 1:
            raise ConfigError(f"{key}.train_num must be in [4, 50000] and test_num >= 1, "
                              f"got {self.train_num}/{self.test_num}")
        if self.seed_offset < 0:
            raise ConfigError(f"{key}.seed_offset must be >= 0, got {self.seed_offset}")
        if (self.train_data is None) != (self.test_data is None):
            raise ConfigError(f"{key}.train_data and {key}.test_data must be given together")
        if self.pixels_per_image < 1 or self.batch_size < 1:
            raise ConfigError(f"{key}.pixels_per_image and {key}.batch_size must be >= 1")
        if not self.ridge or any(r <= 0 for r in self.ridge):
            raise ConfigError(f"{key}.ridge must be a non-empty list of positive strengths, got {self.ridge}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{key}.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class ServeConfig:
    """The student as a Ray Serve application (``jobs/serve.py``, ``must_ray.serve``; docs/serving.md)."""

    model: Optional[str] = None  # must-ray model file; None = <paths.root>/<paths.student>/model.pt
    app_name: str = "must"
    route_prefix: str = "/"
    # The HTTP proxy's address. Serve's HTTP endpoint is NOT covered by Ray's token auth: anything
    # but loopback lets everyone who can reach the port use the model (docs/serving.md).
    host: str = "127.0.0.1"
    port: int = 8000
    num_replicas: list[int] = field(default_factory=lambda: [1, 1])  # [min, max]; min < max = autoscaling
    target_ongoing_requests: float = 16.0  # autoscaling: requests in flight per replica it aims for
    max_ongoing_requests: int = 64  # per replica; more wait in the proxy (>= max_batch_size to fill batches)
    max_batch_size: int = 16  # images one forward pass takes (@serve.batch)
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    torch_threads: int = 0  # intra-op threads per replica; 0 = max(1, round(num_cpus_per_replica))
    max_request_bytes: int = 20 * 1024 * 1024  # bigger bodies get 413
    max_image_pixels: int = 40_000_000  # bigger images get 413 (checked before decoding)
    max_map_pixels: int = 2048 * 2048  # largest dense map a response holds (the default size shrinks to fit)
    path_roots: list[str] = field(default_factory=list)  # JSON {"path": ...} may name files under these only

    def validate(self, key: str) -> None:
        if not self.host:
            raise ConfigError(f"{key}.host must be an address (127.0.0.1 keeps the endpoint on this machine)")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"{key}.port must be in [1, 65535], got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"{key}.route_prefix must start with '/', got {self.route_prefix!r}")
        if len(self.num_replicas) != 2 or not 1 <= self.num_replicas[0] <= self.num_replicas[1]:
            raise ConfigError(f"{key}.num_replicas must be [min, max] with 1 <= min <= max, got {self.num_replicas}")
        for name in ("max_ongoing_requests", "max_batch_size", "max_request_bytes", "max_image_pixels",
                     "max_map_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(self, name)}")
        if self.target_ongoing_requests <= 0 or self.batch_wait_timeout_s < 0:
            raise ConfigError(f"{key}.target_ongoing_requests must be > 0 and batch_wait_timeout_s >= 0")
        if self.num_cpus_per_replica < 0 or self.num_gpus_per_replica < 0 or self.torch_threads < 0:
            raise ConfigError(f"{key}.num_cpus_per_replica/num_gpus_per_replica/torch_threads must be >= 0")


@dataclass
class RayConfig:
    """How a job connects to Ray. ``address=None``: the cluster in ``RAY_ADDRESS`` (``ray job submit``
    sets it) or else a fresh local instance (never a stray one); ``"auto"`` attaches to the cluster
    this node belongs to (e.g. after ``ray attach``)."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None  # only for a local instance

    def validate(self, key: str) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"{key}.num_cpus must be >= 1, got {self.num_cpus}")


@dataclass
class Config:
    """The whole configuration of a must-ray pipeline run.

    ``task_modules`` names modules that define tasks outside must_ray (``[my_pkg.edges]``);
    :func:`config_from_dict` imports them before anything else, so their tasks get defaults and
    validation in ``tasks``, ``world.splits`` and ``label.teachers`` like the built-in ones, and Ray
    workers, which rebuild their config from its dict, register them too. Each module must be
    importable in every Ray process (``docs/tasks.md``)."""

    name: str = "must"
    task_modules: list[str] = field(default_factory=list)  # modules with tasks outside must_ray
    paths: PathsConfig = field(default_factory=PathsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    tasks: TaskConfigs = field(default_factory=default_task_configs)  # each task's own knobs (its config_class)
    teacher: TrainConfig = field(default_factory=TrainConfig)  # each teacher's run (one task)
    student: TrainConfig = field(default_factory=TrainConfig)  # the multi-task student's run
    label: LabelConfig = field(default_factory=LabelConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # self-training rounds (Noisy Student's loop): round r > 1 relabels the pool with the round r-1
    # student as the teacher of every task and trains a fresh student on those labels
    rounds: int = 1

    def validate(self, key: str = "") -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty string without '/', got {self.name!r}")
        if not 1 <= self.rounds <= 10:
            raise ConfigError(f"rounds must be in [1, 10] (1 = teachers -> student only), got {self.rounds}")


def _train_config_for(base: TrainConfig, changes: dict, key: str) -> TrainConfig:
    merged = deep_merge({k: v for k, v in config_to_dict(base).items() if k != "per_task"}, changes)
    return build_dataclass(TrainConfig, merged, key)


def teacher_config(cfg: Config, task: str) -> Config:
    """``cfg`` with ``teacher`` replaced by the settings of ``task``'s teacher (``teacher`` merged
    with ``teacher.per_task[task]``), so one training code path serves every teacher's recipe."""
    changes = cfg.teacher.per_task.get(task)
    if not changes:
        return cfg
    return dataclasses.replace(cfg, teacher=_train_config_for(cfg.teacher, changes, f"teacher.per_task.{task}"))


def _known_tasks() -> tuple[str, ...]:
    return registered_task_names()


# ----------------------------------------------------------------------------- loading


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (``3``, ``0.5``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    return key, value


def config_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate a :class:`Config` from a mapping plus ``dotted.key=value`` overrides."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError("the config must be a mapping at the top level")
    parsed = [parse_override(text) for text in overrides]
    modules = (data or {}).get("task_modules", [])
    for key, value in parsed:
        if key == "task_modules":
            modules = value
    load_task_modules(coerce_value(modules, list[str], "task_modules"))
    # YAML and overrides merge *into* the defaults (mappings key by key), so a config that tunes
    # one task's threshold keeps the other tasks, and `--set world.splits.test.num=8` works even
    # when the YAML does not mention that split.
    merged = deep_merge(config_to_dict(Config()), data or {})
    for key, value in parsed:
        _set_dotted(merged, key, value)
    cfg = build_dataclass(Config, merged, "")
    validate_tree(cfg, "")
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML; ``None`` = built-in defaults) and apply ``--set`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None
