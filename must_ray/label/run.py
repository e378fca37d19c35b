"""Pseudo-labelling with Ray Data: every input image gets a label from every teacher, written as
an examples table exactly once (MuST step 2). Reference: ``docs/labeling.md``.

Pipeline (one streaming Ray Data execution, :func:`build_pipeline`)::

    from_items(shard descriptors)                       driver: (piece, batch) per shard, never an id
      -> map_batches(decode_shards)         tasks        read, decode, resize ONCE, PNG the image cell
      -> map_batches(ShardLabeler)          actor pool   ALL teachers on the decoded shard, encode
                                                         the label cells, commit the shard
      -> iter_batches()                     driver       one small report row per committed shard

A *shard* (``label.shard_size`` inputs, fixed by the plan) travels through the pipeline as ONE
row, so an actor always holds a whole shard and commits it as one unit (``label.store``: the
quarantine file, then the part file; the part file's appearance is the commit). Resuming = labelling
the shards without a part file. A run, in order: :class:`LabelRun` resolves and plans (the plan is
written in pieces by Ray tasks, ``label.plan``), :func:`build_pipeline` + :class:`Progress` label
the pending shards, ``label.verify`` checks exactly once in Ray tasks, :func:`summarise` writes the
summary. The driver's memory grows with the number of shards, never with the number of images.
The actor itself is ``label.labeler``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from must_ray import __version__
from must_ray.config import Config
from must_ray.label.inputs import (
    LabelInput,
    decode_shards,
    make_prepare_context,
    parquet_files,
    resolve_input,
    table_file_ids,
)
from must_ray.label.labeler import ShardLabeler
from must_ray.label.paths import check_output_dir
from must_ray.label.plan import Plan, load_plan, write_plan
from must_ray.label.store import OutputStore
from must_ray.label.teachers import resolve_teachers
from must_ray.label.teachers.weights import WeightsFiles
from must_ray.label.verify import verify_output
from must_ray.progress import progress_text
from must_ray.table import examples_schema
from must_ray.tasks import registered_task_names
from must_ray.typed_config import ConfigError, config_to_dict

log = logging.getLogger("must_ray.label.run")

# what must match for a rerun to resume an existing output (anything else may change)
RESUME_KEYS = ("input", "tasks", "teachers", "thresholds", "classes", "image_size", "shard_size", "shard_bytes",
               "max_image_pixels", "max_file_bytes", "extensions", "precision")
#: bytes per pixel at the label size a part-file row is assumed to take at most: the image (RGB)
#: plus up to three per task (a dense label); the basis of ``label.shard_bytes``
ROW_BYTES_PER_PIXEL = (3, 3)
STAGES = ("decode_s", "teachers_s", "encode_s", "write_s")


# ----------------------------------------------------------------------------- settings


def label_tasks(cfg: Config) -> list[str]:
    """The tasks a run labels, in canonical order."""
    names = cfg.label.tasks or list(cfg.label.teachers)
    order = registered_task_names()
    return sorted(dict.fromkeys(names), key=order.index)


def label_image_size(cfg: Config) -> int:
    """The side every input is decoded and resized to once (``label.image_size``, else the world's)."""
    return int(cfg.label.image_size or cfg.world.image_size)


def label_shard_size(cfg: Config, tasks: Optional[list[str]] = None) -> int:
    """Inputs per shard: ``label.shard_size``, fewer when that many rows would make a part file
    larger than ``label.shard_bytes`` (estimated at the label size: :data:`ROW_BYTES_PER_PIXEL`)."""
    s = label_image_size(cfg)
    n_tasks = len(tasks if tasks is not None else label_tasks(cfg))
    row_bytes = s * s * (ROW_BYTES_PER_PIXEL[0] + ROW_BYTES_PER_PIXEL[1] * n_tasks)
    return max(1, min(cfg.label.shard_size, cfg.label.shard_bytes // row_bytes))


def label_output(cfg: Config, output: Optional[str] = None) -> str:
    """The output table: ``output``, else ``label.output``, else ``<paths.root>/<paths.labels>``."""
    return output or cfg.label.output or cfg.paths.resolve("labels")


def decode_memory_bytes(cfg: Config) -> int:
    """Heap memory one decode task reserves: a shard's pixels a few times over (decoded original,
    resized copy, Arrow row) plus a base. Besides keeping big shards from overcommitting a node,
    this reservation makes the decode tasks' resources differ from the teacher actors', which is
    what stops Ray Data from fusing the decode step *into* the actors (it fuses a task map into a
    following actor map when both reserve the same resources): decoding shard k+1 must overlap the
    teachers on shard k, not run inside the actor between them."""
    s = label_image_size(cfg)
    return int(64 * 2**20 + 4 * label_shard_size(cfg) * s * s * 3)


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def check_output(store: OutputStore) -> None:
    """Refuse (:class:`ConfigError`, one line) a local output whose folder, or a folder the run
    keeps beside it, exists as a file or lies under a file."""
    if store.local:
        check_output_dir(store.root)
        for beside in (store.quarantine_dir, store.manifest_dir):
            check_output_dir(beside, "the folder beside --output")


def check_label_paths(cfg: Config) -> None:
    """The labelling checks that need neither teachers nor Ray: the configured input (the default
    is the world split the pipeline renders first), the output, and every teacher file named by
    ``path`` (the trained teachers' default paths are written by the steps before). The pipeline
    runs them before its first step, so a bad path fails before minutes of world and teachers."""
    if cfg.label.input:
        resolve_input(cfg, cfg.label.input)
    check_output(OutputStore(label_output(cfg)))
    for task in label_tasks(cfg):
        path = cfg.label.teachers[task].path
        if path and not WeightsFiles.exists(path):
            raise ConfigError(f"label.teachers.{task}.path: file not found: {path} (kind="
                              f"{cfg.label.teachers[task].kind}); point it at the teacher's weights or model file")


# ----------------------------------------------------------------------------- resolve + plan


@dataclass
class Pending:
    """The shards of a plan this run labels: those without a committed part file."""

    num_shards: int
    committed: set[int]
    shards: list[int]
    descriptors: list[dict[str, Any]]
    images: int


class LabelRun:
    """Everything a labelling run decides before any work: input, teachers (resolved, hashed),
    provenance, and (:meth:`open`) the plan. ``jobs/label.py`` builds it before starting Ray so a
    missing teacher or input fails fast."""

    def __init__(self, cfg: Config, input_uri: Optional[str] = None, output: Optional[str] = None):
        self.cfg = cfg
        self.tasks = label_tasks(cfg)
        if not self.tasks:
            raise ConfigError("label.tasks: nothing to label (no teachers)")
        self.image_size = label_image_size(cfg)
        self.output = label_output(cfg, output)
        self.input: LabelInput = resolve_input(cfg, input_uri if input_uri is not None else cfg.label.input)
        # teachers first: a missing teacher fails before any listing or writing
        self.specs, self.classes = resolve_teachers(cfg, self.tasks, self.image_size)
        self.store = OutputStore(self.output)
        check_output(self.store)
        self.identity = {
            "input": self.input.describe(),
            "tasks": list(self.tasks),
            "teachers": [s.provenance() for s in self.specs],
            "thresholds": {t: config_to_dict(cfg.tasks[t]) for t in self.tasks if t in cfg.tasks},
            "classes": list(self.classes),
            "image_size": self.image_size,
            "shard_size": label_shard_size(cfg, self.tasks),
            "shard_bytes": cfg.label.shard_bytes,
            "max_image_pixels": cfg.label.max_image_pixels,
            "max_file_bytes": cfg.label.max_file_bytes,
            "extensions": sorted(e.lower().lstrip(".") for e in cfg.label.extensions),
            "precision": cfg.label.precision,  # the setting; auto resolves on each actor's device
        }
        self.provenance = {
            "kind": "pseudo_labels",
            **self.identity,
            "image": f"resized to {self.image_size}x{self.image_size} (PNG); height/width = original size; "
                     f"dense labels at {self.image_size}x{self.image_size}",
            "code_version": __version__,
        }
        self.schema = examples_schema(self.tasks, self.provenance)
        self.prepare_ctx = make_prepare_context(cfg, self.input, self.image_size)
        self.ignored: dict[str, int] = {}
        self._plan: Optional[Plan] = None

    def resuming(self) -> bool:
        """Whether the output already holds a complete plan (its ``run.json``)."""
        return not self.cfg.label.overwrite and self.store.read_run() is not None

    def check_input(self) -> None:
        """The input checks that need no Ray, for a new output: every file of a table input is a
        usable table (``inputs.table_file_ids``, one file at a time). The job runs it before
        starting Ray, so a malformed table is a one-line error before anything starts."""
        if self.input.kind == "table" and not self.resuming():
            files = parquet_files(self.input.filesystem, self.input.root)
            if not files:
                raise ConfigError(f"--input {self.input.uri}: no Parquet files")
            for path in files:
                table_file_ids(self.input, path)

    def open(self) -> Plan:
        """Create or resume the output; returns the plan (the same one on every call), written in
        pieces by Ray tasks when Ray is connected (here otherwise). Raises ConfigError when the
        output holds a run with other settings or the input holds nothing to label."""
        if self._plan is None:
            self._plan = self._open()
        return self._plan

    def _open(self) -> Plan:
        if self.cfg.label.overwrite:
            self.store.clear()
        previous = self.store.read_run()
        plan = load_plan(self.store) if previous else None
        if previous is not None and plan is not None:
            # a key an older must-ray did not record cannot differ (its plan is fixed anyway)
            diffs = [k for k in RESUME_KEYS
                     if k in previous and _canon(previous.get(k)) != _canon(self.identity.get(k))]
            if diffs:
                raise ConfigError(
                    f"label.output {self.output} already holds a labelling run with other settings "
                    f"(differs: {', '.join(diffs)}); resume it with the same settings, choose a new --output, "
                    f"or --set label.overwrite=true to start over")
            self.ignored = dict(previous.get("ignored") or {})
            self.store.files_per_dir = int(previous.get("files_per_dir") or 0)
            self.store.makedirs()
            return plan
        self.store.clear_plan()  # the pieces of a planning run that died before its run.json
        import ray

        plan, ignored = write_plan(self.store, self.cfg, self.input, label_shard_size(self.cfg, self.tasks),
                                   remote=ray.is_initialized())
        if not plan.num_rows:
            self.store.clear_plan()
            found = ", ".join(f"{n} {kind}" for kind, n in ignored.items())
            raise ConfigError(f"--input {self.input.uri}: nothing to label (no images"
                              + (f"; found only entries that are not inputs: {found}" if found else "")
                              + "); see label.extensions")
        self.ignored = ignored
        per_dir = self.cfg.label.files_per_dir
        self.store.files_per_dir = per_dir if plan.num_shards > per_dir else 0
        self.store.makedirs()
        # run.json last: present => the plan is complete
        self.store.write_run({**self.identity, "ignored": ignored, "num_inputs": plan.num_rows,
                              "num_shards": plan.num_shards, "files_per_dir": self.store.files_per_dir})
        return plan

    def pending(self, plan: Plan) -> Pending:
        """The shards of ``plan`` still to label (stale temp files of a crashed run removed first)."""
        self.store.clean_tmp()
        committed = self.store.committed_shards()
        shards = [s for s in range(plan.num_shards) if s not in committed]
        return Pending(plan.num_shards, committed, shards, plan.descriptors(shards), plan.images(shards))


# ----------------------------------------------------------------------------- the Ray Data pipeline


def build_pipeline(run: LabelRun, descriptors: list[dict[str, Any]]):
    """The streaming Ray Data dataset that labels and commits ``descriptors``' shards; iterating it
    yields one report row per committed shard (``labeler.REPORT_SCHEMA``)."""
    import ray

    lc = run.cfg.label
    # weights travel once through the object store, not in every actor's arguments
    specs = [dataclasses.replace(s, blob=ray.put(s.blob) if s.blob is not None else None) for s in run.specs]
    max_actors = min(lc.actors[1], len(descriptors))
    ds = ray.data.from_items(descriptors, override_num_blocks=len(descriptors))
    ds = ds.map_batches(decode_shards, fn_kwargs={"ctx": run.prepare_ctx}, batch_size=1, batch_format="pyarrow",
                        num_cpus=lc.decode_num_cpus, memory=decode_memory_bytes(run.cfg))
    return ds.map_batches(
        ShardLabeler,
        fn_constructor_kwargs={"cfg_dict": config_to_dict(run.cfg), "specs": specs, "classes": run.classes,
                               "tasks": run.tasks, "image_size": run.image_size, "provenance": run.provenance,
                               "output": run.output, "files_per_dir": run.store.files_per_dir},
        batch_size=1, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=min(lc.actors[0], max_actors), max_size=max_actors),
        num_cpus=lc.num_cpus_per_actor, num_gpus=lc.num_gpus_per_actor or None,
    )  # Ray Data restarts a crashed actor and retries its shard (max_restarts=-1): commits are idempotent


class RunObserver:
    """Optional hooks into :func:`run_labeling` for callers that want more than the summary (the
    benchmarks' profile, ``benchmarks/label_profile.py``): the epoch second the pipeline starts,
    then every committed shard's report row (``labeler.REPORT_SCHEMA``) as it arrives."""

    def pipeline_started(self, epoch_s: float) -> None:
        pass

    def shard_committed(self, report: dict[str, Any]) -> None:
        pass


class Progress:
    """The driver's tally of committed shards: counts and per-stage seconds for the summary, the
    run's start-up and steady rate, and a progress line on stderr every ``log_every_s`` seconds
    (and at the end).

    *Start-up* is the fixed cost before any labelling: from the pipeline's start until the first
    teacher actor is ready (Ray scheduling, the actor process, importing torch, building the
    teachers). The *steady rate* counts the images from then until the last commit, so it does
    not shrink with a short run the way images / wall time does."""

    def __init__(self, pending: Pending, log_every_s: float):
        self.shards_total, self.images_total, self.log_every_s = len(pending.shards), pending.images, log_every_s
        self.shards = self.images = self.retried = 0
        self.stage_s = dict.fromkeys(STAGES, 0.0)
        self.teacher_s: dict[str, float] = {}
        self.started = self.last_log = time.perf_counter()
        self.started_at = time.time()
        self.first_ready_at: Optional[float] = None  # epoch seconds: the first actor ready to label
        self.last_commit_at: Optional[float] = None

    def add(self, report: dict[str, Any]) -> None:
        """Count one committed shard's report."""
        self.shards += 1
        self.images += report["rows"] + report["quarantined"]
        if report.get("retry_of_node"):
            self.retried += 1
            print(f"[label] shard {report['shard']} was retried: its first attempt, on node "
                  f"{report['retry_of_node'][:12]}, was lost mid-shard", file=sys.stderr, flush=True)
        for k in STAGES:
            self.stage_s[k] += report[k]
        for name, sec in json.loads(report["teacher_s"]).items():
            self.teacher_s[name] = self.teacher_s.get(name, 0.0) + sec
        ready, committed = report["actor_ready_at"], report["committed_at"]
        self.first_ready_at = ready if self.first_ready_at is None else min(self.first_ready_at, ready)
        self.last_commit_at = committed if self.last_commit_at is None else max(self.last_commit_at, committed)

    @property
    def startup_s(self) -> Optional[float]:
        """Seconds from the pipeline's start until the first teacher actor was ready (None before
        any shard was committed)."""
        return None if self.first_ready_at is None else max(0.0, self.first_ready_at - self.started_at)

    def steady_rate(self, until: Optional[float] = None) -> float:
        """Images per second from the first actor being ready until ``until`` (epoch seconds;
        default the last commit); 0 before any commit."""
        if self.first_ready_at is None:
            return 0.0
        end = until if until is not None else self.last_commit_at
        return self.images / max(end - self.first_ready_at, 1e-9)

    def log(self) -> None:
        """The progress line, when ``log_every_s`` passed since the last one or every shard is done."""
        now = time.perf_counter()
        if now - self.last_log >= self.log_every_s or self.shards == self.shards_total:
            startup = f" after {self.startup_s:.1f}s start-up" if self.startup_s is not None else ""
            print(progress_text("label", self.images, self.images_total, "images", self.steady_rate(time.time()),
                                f" this run, {self.shards}/{self.shards_total} shards{startup}"),
                  file=sys.stderr, flush=True)
            self.last_log = now


# ----------------------------------------------------------------------------- verify + summarise


def summarise(run: LabelRun, pending: Pending, counts: dict[str, Any], progress: Progress, pipeline_s: float,
              total_s: float) -> dict[str, Any]:
    """The job's summary (also written as ``<output>_manifest/SUCCESS.json``). ``images_per_s`` is
    the steady rate and ``startup_s`` the fixed cost before it (:class:`Progress`);
    ``end_to_end_images_per_s`` is images / pipeline seconds, start-up included."""
    images = pending.images
    summary = {
        "job": "label",
        "output": run.output,
        "quarantine": run.store.quarantine_uri if counts["quarantined"] else None,
        "input": run.input.uri,
        "input_kind": run.input.kind,
        "inputs": counts["inputs"],
        "rows": counts["rows"],
        "quarantined": counts["quarantined"],
        "quarantine_reasons": counts["quarantine_reasons"],
        "exactly_once": counts["exactly_once"],
        "ignored": run.ignored,
        "ignored_files": sum(run.ignored.values()),
        "tasks": run.tasks,
        "teachers": {t: {"name": s.name, "kind": s.kind, "sha256": s.sha256} for s in run.specs for t in s.tasks},
        "shards": pending.num_shards,
        "shards_skipped": len(pending.committed),
        "shards_labeled": len(pending.shards),
        "shards_retried": progress.retried,
        "images_this_run": images,
        "images_per_s": round(progress.steady_rate(), 2) if progress.images else 0.0,
        "startup_s": round(progress.startup_s, 2) if progress.startup_s is not None else None,
        "end_to_end_images_per_s": round(images / pipeline_s, 2) if images else 0.0,
        "pipeline_s": round(pipeline_s, 2),
        "total_s": round(total_s, 2),
        "stage_s": {k: round(v, 2) for k, v in progress.stage_s.items()},
        "teacher_s": {k: round(v, 2) for k, v in progress.teacher_s.items()},
    }
    assert summary["rows"] + summary["quarantined"] == summary["inputs"], summary
    return summary


def run_labeling(cfg: Config, input_uri: Optional[str] = None, output: Optional[str] = None,
                 log_every_s: float = 10.0, run: Optional[LabelRun] = None,
                 observer: Optional[RunObserver] = None) -> dict[str, Any]:
    """Label ``input_uri`` (default ``label.input``, else the world's unlabeled split) into
    ``output`` (default ``label.output``, else ``<paths.root>/<paths.labels>``) with Ray Data,
    resuming a previous run into the same output. Needs a connected Ray. Returns the summary.
    ``run``: an already resolved :class:`LabelRun` (the job resolves it before starting Ray);
    ``observer``: sees every shard's report (the benchmarks' extra figures)."""
    t_start = time.perf_counter()
    observer = observer or RunObserver()
    run = run or LabelRun(cfg, input_uri, output)
    plan = run.open()
    pending = run.pending(plan)
    log.info("labelling %s -> %s: %d inputs in %d shards (%d already committed, %d shards / %d images to do), "
             "tasks %s", run.input.uri, run.output, plan.num_rows, pending.num_shards, len(pending.committed),
             len(pending.shards), pending.images, ", ".join(run.tasks))
    progress = Progress(pending, log_every_s)
    observer.pipeline_started(progress.started_at)
    if pending.descriptors:
        for batch in build_pipeline(run, pending.descriptors).iter_batches(batch_size=None, batch_format="pyarrow"):
            for report in batch.to_pylist():
                progress.add(report)
                observer.shard_committed(report)
            progress.log()
    pipeline_s = time.perf_counter() - progress.started
    summary = summarise(run, pending, verify_output(run.store, plan), progress, pipeline_s,
                        time.perf_counter() - t_start)
    run.store.write_success(summary)
    return summary


__all__ = ["run_labeling", "check_label_paths", "check_output", "LabelRun", "Pending", "RunObserver", "Progress",
           "build_pipeline", "verify_output", "summarise", "label_tasks", "label_image_size", "label_shard_size",
           "label_output", "decode_memory_bytes"]
