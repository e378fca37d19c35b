"""One Ray Train (V2) run for a specialised teacher or the multi-task student: the driver side.

:func:`train` is the whole API: it resolves the examples tables into one Ray Dataset, launches a
``TorchTrainer`` whose workers each run a :class:`~must_ray.train.trainer.Trainer`, and exports
the result (``<out_dir>/model.pt``, ``metrics.jsonl``, ``summary.json``). A teacher is a run with
one task and real labels; the student is a run with every task of the pseudo-label table(s),
optionally unioned with real-label tables (partial labels) - null cells mask a task's loss row by
row. A run whose name already has checkpoints under the storage path resumes from the latest.
The training jobs' flags (:func:`must_ray.cli.add_train_flags`) are shorthands for ``--set <role>.<key>``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from must_ray.config import Config, TrainConfig, teacher_config
from must_ray.io import HISTORY_FILE, MODEL_FILE, atomic_path, is_uri
from must_ray.models.export import check_model_file
from must_ray.progress import current_tag, progress_tag
from must_ray.ray_logs import train_log_level
from must_ray.storage import check_shared_storage
from must_ray.table import table_classes, table_rows, table_tasks, tables_bytes
from must_ray.train.checkpoint import (
    META_FILE,
    checkpoint_meta,
    read_history,
    registered_checkpoints,
    remove_unregistered_checkpoints,
    write_history,
)
from must_ray.train.dataset import cache_in_object_store, read_tables
from must_ray.train.trainer import RunSpec, StepHook, train_loop_per_worker
from must_ray.typed_config import ConfigError, config_to_dict

log = logging.getLogger("must_ray.train.driver")

ROLES = ("teacher", "student")
#: Ray Train's storage under a run's ``--out`` unless ``checkpoint.storage_path`` is set
RAY_TRAIN_DIR = "ray_train"


@dataclass
class TrainPlan:
    """What :func:`train` resolved before launching a run: its inputs, identity and outputs."""

    cfg: Config
    role: str
    data: list[str]
    tasks: list[str]
    classes: list[str]
    rows: int
    out_dir: str  # where the outputs end up (a local dir or a URI)
    stage: str  # where the driver writes them first (out_dir itself unless it is a URI)
    run_name: str
    storage: str
    submission: str = field(default_factory=lambda: uuid.uuid4().hex)  # this call's id in the run's attempts

    @property
    def tcfg(self) -> TrainConfig:
        return getattr(self.cfg, self.role)

    @property
    def experiment_dir(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.run_name}"

    @property
    def image_size(self) -> int:
        return int(self.tcfg.input.image_size or self.cfg.world.image_size)


def train(cfg: Config, role: str, data: Optional[Sequence[str]] = None, tasks: Optional[Sequence[str]] = None,
          out_dir: Optional[str] = None, run_name: Optional[str] = None,
          step_hooks: Sequence[StepHook] = ()) -> dict[str, Any]:
    """Train a teacher (``role="teacher"``, one task) or the student (``role="student"``) with
    Ray Train on the examples tables ``data`` (default ``cfg.<role>.data``); ``tasks`` default to
    ``cfg.<role>.tasks`` or every task with a presence column in the tables. Writes
    ``<out_dir>/model.pt`` (EMA weights when EMA is on), ``metrics.jsonl`` and ``summary.json``
    and returns the summary. A run whose name already has checkpoints under the storage path
    resumes from its latest checkpoint. ``step_hooks``: picklable ``hook(trainer)`` callables
    every worker runs after each step (tests use them to inject faults). Needs a connected Ray
    (``must_ray.cli.init_ray``)."""
    t_start = time.time()
    plan = plan_run(cfg, role, data, tasks, out_dir, run_name)
    resume_point(plan)
    warn_if_cpus_oversubscribed(plan)
    dataset, cached = training_dataset(plan)
    spec = RunSpec(config=config_to_dict(plan.cfg), role=role, tasks=plan.tasks, classes=plan.classes,
                   num_rows=plan.rows, image_size=plan.image_size, run_name=plan.run_name, data=plan.data,
                   experiment_dir=plan.experiment_dir, cached=cached, step_hooks=list(step_hooks),
                   submission=plan.submission)
    t_fit = time.time()
    result = fit(spec, dataset, plan)
    fit_s = time.time() - t_fit
    drop_unregistered(plan)
    meta, history = export_outputs(result, plan)
    summary = summarise(plan, result, meta, history, cached=cached)
    summary.update(fit_s=round(fit_s, 2), wall_s=round(time.time() - t_start, 2))
    with open(os.path.join(plan.stage, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    publish(plan)
    return summary


# ----------------------------------------------------------------------------- before the run


def plan_run(cfg: Config, role: str, data: Optional[Sequence[str]], tasks: Optional[Sequence[str]],
             out_dir: Optional[str], run_name: Optional[str]) -> TrainPlan:
    """Resolve a run: the teacher's own recipe, the tables and their tasks/classes/rows, the
    output and storage locations (refused when node-local on a multi-node cluster), the run name."""
    if role == "teacher" and tasks and len(tasks) == 1:
        cfg = teacher_config(cfg, tasks[0])  # that teacher's recipe (teacher.per_task)
    cfg = absolute_model_files(cfg, role)
    tcfg, data, names, classes, rows = _resolve_inputs(cfg, role, data, tasks)
    if out_dir is None:
        out_dir = cfg.paths.resolve("teachers") + f"/{names[0]}" if role == "teacher" else cfg.paths.resolve("student")
    out_dir = str(out_dir) if is_uri(str(out_dir)) else os.path.abspath(out_dir)
    stage = tempfile.mkdtemp(prefix="must_ray_out_") if is_uri(out_dir) else out_dir
    os.makedirs(stage, exist_ok=True)
    plan = TrainPlan(cfg=cfg, role=role, data=data, tasks=names, classes=classes, rows=rows, out_dir=out_dir,
                     stage=stage, run_name=run_name or tcfg.checkpoint.run_name or default_run_name(cfg, role, names),
                     storage=default_storage_path(tcfg, out_dir))
    check_shared_storage([(f"{role}.checkpoint.storage_path", plan.storage), ("--out", out_dir)])
    return plan


def absolute_model_files(cfg: Config, role: str) -> Config:
    """``cfg`` with ``<role>.model.init_checkpoint`` and ``backbone_weights`` made absolute when
    they are local paths: the workers open them, and a worker's working directory is not the
    driver's (a relative path the driver had checked was not found there)."""
    model = getattr(cfg, role).model
    files = {k: os.path.abspath(v) for k in ("init_checkpoint", "backbone_weights")
             if (v := getattr(model, k)) and not is_uri(v)}
    if not files:
        return cfg
    section = dataclasses.replace(getattr(cfg, role), model=dataclasses.replace(model, **files))
    return dataclasses.replace(cfg, **{role: section})


def _resolve_inputs(cfg: Config, role: str, data: Optional[Sequence[str]], tasks: Optional[Sequence[str]]):
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
    tcfg: TrainConfig = getattr(cfg, role)
    data = [str(p) for p in (data or tcfg.data)]
    if not data:
        raise ConfigError(f"{role}.data: no training tables given")
    for p in data:
        if not is_uri(p) and not os.path.exists(p):
            raise ConfigError(f"{role}.data: table not found: {p}")
    present = table_tasks(data)
    names = list(tasks or tcfg.tasks or present)
    if not names:
        raise ConfigError(f"{role}: the tables {data} hold no task columns")
    missing = [t for t in names if t not in present]
    if missing:
        raise ConfigError(f"{role}.tasks: {missing} have no labels in {data} (tables hold {present})")
    if role == "teacher" and len(names) != 1:
        raise ConfigError(f"teacher.tasks: a teacher trains exactly one task, got {names}")
    if tcfg.model.init_checkpoint and not is_uri(tcfg.model.init_checkpoint):
        check_model_file(tcfg.model.init_checkpoint, f"{role}.model.init_checkpoint")
    classes = table_classes(data)
    rows = sum(table_rows(p) for p in data)
    return tcfg, data, names, classes, rows


def default_storage_path(tcfg: TrainConfig, out_dir: str) -> str:
    """``checkpoint.storage_path`` or ``<out_dir>/ray_train`` (so ``--out`` holds everything a run
    writes), absolute (Ray needs that) unless a URI."""
    path = tcfg.checkpoint.storage_path or f"{out_dir.rstrip('/')}/{RAY_TRAIN_DIR}"
    return path if is_uri(path) else os.path.abspath(path)


def default_run_name(cfg: Config, role: str, tasks: Sequence[str]) -> str:
    """``<name>-teacher-<task>`` or ``<name>-student``."""
    return f"{cfg.name}-teacher-{tasks[0]}" if role == "teacher" else f"{cfg.name}-student"


def resume_point(plan: TrainPlan) -> Optional[int]:
    """The step of the checkpoint Ray Train will hand the run's workers (its latest *registered*
    one) when the run already exists, else None; first removes checkpoint directories Ray Train
    never registered (an orphaned worker's). Refuses a run trained with other tasks, classes or
    backbone; warns when the data changed."""
    if not is_uri(plan.storage):
        os.makedirs(plan.storage, exist_ok=True)
    drop_unregistered(plan)
    latest, _ = registered_checkpoints(plan.experiment_dir)
    if latest is None:
        return None
    meta = checkpoint_meta(latest)
    backbone = plan.tcfg.model.backbone
    if list(meta.get("tasks", [])) != plan.tasks or list(meta.get("classes", [])) != plan.classes \
            or meta.get("backbone") != backbone:
        raise ConfigError(
            f"run {plan.run_name!r} in {plan.storage} was trained with tasks {meta.get('tasks')}, "
            f"backbone {meta.get('backbone')!r}; this submission has tasks {plan.tasks}, backbone "
            f"{backbone!r}. Choose another --run-name or delete {plan.experiment_dir}")
    step = int(meta["step"])
    log.info("run %s: resuming from its checkpoint at step %d (%s)", plan.run_name, step, latest.path)
    if meta.get("data") is not None and (list(meta["data"]) != plan.data or meta.get("rows") != plan.rows):
        log.warning("run %s was trained on %s (%s rows); it now continues on %s (%s rows). Use a new "
                    "--run-name to train from scratch on the new data", plan.run_name, meta["data"],
                    meta.get("rows"), plan.data, plan.rows)
    return step


def drop_unregistered(plan: TrainPlan) -> None:
    """Remove (and log) the run's checkpoint directories Ray Train never registered."""
    removed = remove_unregistered_checkpoints(plan.experiment_dir)
    if removed:
        log.warning("run %s: removed %d checkpoint(s) Ray Train never registered (written by a worker that "
                    "outlived its driver): %s", plan.run_name, len(removed), ", ".join(removed))


def warn_if_cpus_oversubscribed(plan: TrainPlan) -> None:
    """Warn when the largest worker group plus one read task would take more CPUs than the cluster has."""
    import ray

    tcfg, scaling = plan.tcfg, plan.tcfg.scaling
    hi = scaling.num_workers[1]
    cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
    read_cpus = tcfg.input.read_cpus
    if not scaling.use_gpu and cluster_cpus and hi * scaling.cpus_per_worker + read_cpus > cluster_cpus + 1e-9:
        log.warning("%d workers x %.2f CPUs + %.2f CPU for reading exceeds the cluster's %.0f CPUs: the elastic "
                    "group may take every CPU and starve the data readers; lower %s.scaling.cpus_per_worker",
                    hi, scaling.cpus_per_worker, read_cpus, cluster_cpus, plan.role)


def training_dataset(plan: TrainPlan):
    """``(Ray Dataset of the tables, cached)``: held in the object store when the tables fit
    ``input.cache_max_mb`` and a quarter of the store, else streamed from Parquet every epoch."""
    import ray

    tcfg = plan.tcfg
    dataset = read_tables(plan.data, plan.tasks, seed=tcfg.seed, read_cpus=tcfg.input.read_cpus)
    size = tables_bytes(plan.data)
    store = float(ray.cluster_resources().get("object_store_memory", 0)) or float("inf")
    cached = size <= min(tcfg.input.cache_max_mb * 2**20, store / 4)
    if cached:
        lo_batch = max(1, tcfg.global_batch_size // tcfg.scaling.num_workers[1])
        with progress_tag(current_tag(""), ray_data=False):  # seconds; Ray's row count here is of blocks
            dataset = cache_in_object_store(dataset, plan.rows, block_rows=max(lo_batch, 32), seed=tcfg.seed)
    return dataset, cached


# ----------------------------------------------------------------------------- the run


def fit(spec: RunSpec, dataset, plan: TrainPlan):
    """Run the ``TorchTrainer`` (elastic when ``scaling.num_workers`` is ``[min, max]`` with
    min < max) to the end; returns its result, raising the run's error."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    tcfg = plan.tcfg
    scaling, ckpt = tcfg.scaling, tcfg.checkpoint
    lo, hi = scaling.num_workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": spec},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(lo, hi) if lo < hi else lo, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
            elastic_resize_monitor_interval_s=scaling.resize_interval_s),
        run_config=ray.train.RunConfig(
            name=plan.run_name, storage_path=plan.storage,
            failure_config=ray.train.FailureConfig(max_failures=ckpt.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ckpt.num_to_keep),
            logging_config=ray.train.LoggingConfig(log_level=train_log_level())),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest_options()),
    )
    with progress_tag(current_tag(""), ray_data=False), controller_env(scaling):  # the workers report progress
        result = trainer.fit()
    if getattr(result, "error", None):
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {plan.run_name!r} finished without a checkpoint")
    return result


#: Ray Train V2 reads these in its controller, which gets them from the driver's environment
CONTROLLER_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "start_timeout_s",
                  "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "poll_interval_s"}


@contextlib.contextmanager
def controller_env(scaling):
    """Hand ``scaling.start_timeout_s`` and ``scaling.poll_interval_s`` to Ray Train's controller
    for one run (a variable already set in this environment wins). They set how fast a run
    recovers from a lost node: Ray's 60 s start timeout keeps a group waiting that long for the
    dead node's workers, and a report is registered only at a poll (a crash within one poll
    interval of a checkpoint loses it)."""
    saved = {var: os.environ.get(var) for var in CONTROLLER_ENV}
    os.environ.update({var: str(getattr(scaling, name)) for var, name in CONTROLLER_ENV.items()
                       if saved[var] is None})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def ingest_options():
    """The Ray Data execution options of the training ingest: Ray Train's defaults, quiet, and in
    order (``preserve_order``: the streaming split hands out blocks, and the collate threads
    return batches, in the seeded order, so one seed gives one data order)."""
    import ray.train
    from ray.data import ExecutionOptions

    options = ray.train.DataConfig.default_ingest_options()
    return ExecutionOptions(resource_limits=options.resource_limits, exclude_resources=options.exclude_resources,
                            preserve_order=True, verbose_progress=False)


# ----------------------------------------------------------------------------- after the run


def export_outputs(result, plan: TrainPlan) -> tuple[dict, list[dict]]:
    """Copy the final checkpoint's model file and history into the stage; returns the
    checkpoint's ``(meta, history)``."""
    model_path = os.path.join(plan.stage, MODEL_FILE)
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
        if not os.path.exists(os.path.join(d, MODEL_FILE)):
            raise RuntimeError(f"the final checkpoint of {plan.run_name!r} ({result.checkpoint.path}) has no "
                               f"{MODEL_FILE}")
        with atomic_path(model_path) as tmp:
            shutil.copyfile(os.path.join(d, MODEL_FILE), tmp)
        history = read_history(d)
    write_history(os.path.join(plan.stage, HISTORY_FILE), history)
    return meta, history


def summarise(plan: TrainPlan, result, meta: dict, history: list[dict], cached: bool) -> dict[str, Any]:
    """The job's summary (``summary.json``, the job's last stdout line), without the timings."""
    last = history[-1] if history else {}
    speeds = [m["images_per_s"] for m in history if m.get("images_per_s")]
    out = plan.out_dir.rstrip("/")
    return {
        "job": f"train_{plan.role}", "role": plan.role, "run_name": plan.run_name, "tasks": plan.tasks,
        "classes": plan.classes, "data": plan.data, "rows": plan.rows, "steps": meta["step"], "epochs": meta["epoch"],
        "total_steps": meta["total_steps"],
        "final_losses": {k[5:]: v for k, v in last.items() if k.startswith("loss_")},
        "loss": last.get("loss"), "images_per_s": (sum(speeds) / len(speeds)) if speeds else None,
        "world_size": last.get("world_size"), "global_batch": last.get("global_batch"), "cached_input": cached,
        "attempts": meta["attempts"], "resumed_from": restored_step(meta["attempts"], plan.submission),
        "checkpoint": result.checkpoint.path, "experiment_dir": plan.experiment_dir, "storage_path": plan.storage,
        "model": f"{out}/{MODEL_FILE}", "metrics": f"{out}/{HISTORY_FILE}", "out_dir": plan.out_dir,
    }


def restored_step(attempts: Sequence[dict], submission: str) -> Optional[int]:
    """The step this submission's first worker group restored from the checkpoint Ray Train
    handed it (None: it started fresh), as the workers recorded it in the run's ``attempts``."""
    for attempt in attempts:
        if attempt.get("submission") == submission:
            return attempt.get("restored_step")
    return None


def publish(plan: TrainPlan) -> None:
    """Upload the staged outputs when ``out_dir`` is a URI (s3://, gs://, ...)."""
    if plan.stage == plan.out_dir:
        return
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(plan.out_dir)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(plan.stage, path, destination_filesystem=fs)
    shutil.rmtree(plan.stage, ignore_errors=True)
