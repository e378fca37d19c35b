"""Pseudo-labelling with Ray Data: every input image gets a label from every teacher, written as
an examples table exactly once (MuST step 2). Reference: ``docs/labeling.md``.

Pipeline (one streaming Ray Data execution)::

    from_items(shard descriptors)                       driver: ids + paths only, never pixels
      -> map_batches(decode_shards)         tasks        read, decode, resize ONCE, PNG the image cell
      -> map_batches(ShardLabeler)          actor pool   ALL teachers on the decoded shard, encode
                                                         the label cells, commit the shard
      -> iter_batches()                     driver       one small summary row per committed shard

A *shard* (``label.shard_size`` inputs, fixed by the plan) travels through the pipeline as ONE
row, so an actor always holds a whole shard and commits it as one unit (``labeling_store``: the
quarantine file, then the part file; the part file's appearance is the commit). Resuming = labelling
the shards without a part file. The plain single-process loop of the benchmark runs the very same
per-image functions (``prepare_image``, ``TeacherSet.predict``, ``Task.encode``) without Ray.
"""
from __future__ import annotations

import time

_IMPORT_STARTED = time.time()  # actor start-up diagnostics: when this module began importing (torch ...)

import json
import logging
import os
import sys
from collections import Counter as _Counter
from typing import Any, Optional

import pyarrow as pa

from must_ray import __version__
from must_ray.config import Config, ConfigError, config_from_dict, config_to_dict
from must_ray.label.inputs import (
    LabelInput,
    PreparedShard,
    decode_shards,
    list_inputs,
    make_prepare_context,
    plan_table,
    resolve_input,
    shard_descriptors,
)
from must_ray.label.store import QUARANTINE_SCHEMA, OutputStore
from must_ray.table import examples_schema
from must_ray.tasks import Task, build_tasks, registered_task_names

_IMPORTED = time.time()
log = logging.getLogger("must_ray.label.run")

# what must match for a rerun to resume an existing output (anything else may change)
RESUME_KEYS = ("input", "tasks", "teachers", "thresholds", "classes", "image_size", "shard_size",
               "max_image_pixels", "max_file_bytes", "extensions")


# ----------------------------------------------------------------------------- settings


def label_tasks(cfg: Config) -> list[str]:
    """The tasks a run labels, in canonical order."""
    names = cfg.label.tasks or list(cfg.label.teachers)
    order = registered_task_names()
    return sorted(dict.fromkeys(names), key=order.index)


def label_image_size(cfg: Config) -> int:
    return int(cfg.label.image_size or cfg.world.image_size)


def label_output(cfg: Config, output: Optional[str] = None) -> str:
    return output or cfg.label.output or cfg.paths.resolve("labels")


def torch_threads(cfg: Config) -> int:
    return int(cfg.label.torch_threads or max(1, round(cfg.label.num_cpus_per_actor)))


# ----------------------------------------------------------------------------- labelling one shard


def _encode_rows(prep: PreparedShard, rows: list[int], labels: dict[str, list[Any]], tasks: dict[str, Task],
                 names: list[str]) -> tuple[dict[str, list[Any]], float]:
    """The table cells of ``prep``'s inputs ``rows`` (their labels in order): base columns plus
    every task's ``Task.encode``. Returns ``(columns, seconds)``."""
    t0 = time.perf_counter()
    cols: dict[str, list[Any]] = {n: [] for n in names}
    for j, i in enumerate(rows):
        cols["image_id"].append(prep.image_id[i])
        cols["image"].append(prep.png[i])
        cols["source"].append(prep.source[i])
        cols["height"].append(prep.height[i])
        cols["width"].append(prep.width[i])
        for name, task in tasks.items():
            for k, v in task.encode(labels[name][j]).items():
                cols[k].append(v)
    return cols, time.perf_counter() - t0


def label_shard(prep: PreparedShard, teachers, tasks: dict[str, Task], schema: pa.Schema, batch_size: int,
                metrics=None, executor=None) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """All teachers on the good images of ``prep`` (mini-batches of ``batch_size``), label cells
    encoded. Returns ``(examples table rows, quarantine rows, timings)``.

    With an ``executor`` (a thread pool), batch i is encoded (PNG: zlib releases the GIL) while the
    teachers run on batch i+1; without one, encoding follows inference inline."""
    timings: dict[str, Any] = {"teachers": {}}
    good = [i for i, r in enumerate(prep.reason) if not r]
    names = [f.name for f in schema]
    parts: list[Any] = []
    teachers_s = 0.0
    t_start = time.perf_counter()
    for start in range(0, len(good), batch_size):
        batch_t: dict[str, float] = {}
        t0 = time.perf_counter()
        out = teachers.predict(prep.pixels[start:start + batch_size], batch_t)
        teachers_s += time.perf_counter() - t0
        rows = good[start:start + batch_size]
        if executor is not None:
            parts.append(executor.submit(_encode_rows, prep, rows, out, tasks, names))
        else:
            parts.append(_encode_rows(prep, rows, out, tasks, names))
        for name, sec in batch_t.items():
            timings["teachers"][name] = timings["teachers"].get(name, 0.0) + sec
            if metrics is not None:
                metrics.teacher_batch(name, sec)
    t_wait = time.perf_counter()
    parts = [p.result() if hasattr(p, "result") else p for p in parts]
    encode_wait_s = time.perf_counter() - t_wait
    cols = {n: [v for c, _ in parts for v in c[n]] for n in names}
    table = pa.Table.from_pydict(cols, schema=schema)
    bad = [i for i, r in enumerate(prep.reason) if r]
    quarantine = pa.Table.from_pydict({
        "image_id": [prep.image_id[i] for i in bad], "path": [prep.locator[i] for i in bad],
        "source": [prep.source[i] for i in bad], "reason": [prep.reason[i] for i in bad],
        "detail": [prep.detail[i] for i in bad], "shard": [prep.shard] * len(bad)}, schema=QUARANTINE_SCHEMA)
    # encode_s: encoding work (overlapped with the teachers when threaded); label_s: the shard's wall time
    timings.update({"teachers_s": teachers_s, "encode_s": sum(sec for _, sec in parts),
                    "encode_wait_s": encode_wait_s, "label_s": time.perf_counter() - t_start})
    return table, quarantine, timings


class ShardLabeler:
    """The teacher actor (``map_batches`` callable class): builds every teacher once, then per
    prepared shard runs them all, encodes and commits. Returns one summary row per shard."""

    def __init__(self, cfg_dict: dict, specs: list, classes: list[str], tasks: list[str], image_size: int,
                 provenance: dict, output: str, device: Optional[str] = None):
        import torch

        from must_ray.label.teachers import TeacherSet
        from must_ray.monitoring import LabelMetrics

        t0 = time.time()
        cfg = config_from_dict(cfg_dict)
        torch.set_num_threads(torch_threads(cfg))
        if device is None:
            device = "cuda" if cfg.label.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.batch_size = cfg.label.batch_size
        self.teachers = TeacherSet(specs, cfg, classes, image_size, device)
        self.tasks = build_tasks(tasks, len(classes), cfg.tasks)
        self.schema = examples_schema(tasks, provenance)
        self.store = OutputStore(output)
        self.metrics = LabelMetrics(output)
        self.executor = None
        if cfg.label.encode_threads > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.executor = ThreadPoolExecutor(cfg.label.encode_threads, thread_name_prefix="encode")
        self.ready_at = time.time()  # epoch seconds: the summary reports actor start-up from it
        self.init_s = self.ready_at - t0
        try:
            import psutil

            started = psutil.Process().create_time()
        except Exception:  # noqa: BLE001
            started = _IMPORT_STARTED
        # epoch seconds of: worker process start, imports begin/end, constructor begin/end
        self.timeline = [started, _IMPORT_STARTED, _IMPORTED, t0, self.ready_at]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.label_and_commit(PreparedShard.from_arrow(batch, r)) for r in range(batch.num_rows)]
        return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)

    def label_and_commit(self, prep: PreparedShard) -> dict[str, Any]:
        cpu0 = time.process_time()  # the actor process's CPU seconds (all its threads) for this shard
        table, quarantine, timings = label_shard(prep, self.teachers, self.tasks, self.schema, self.batch_size,
                                                 self.metrics, self.executor)
        t0 = time.perf_counter()
        self.store.commit_shard(prep.shard, table, quarantine)
        write_s = time.perf_counter() - t0
        m = self.metrics
        m.images_labeled(table.num_rows)
        for reason, n in _Counter(quarantine.column("reason").to_pylist()).items():
            m.images_quarantined(n, reason)
        for stage, sec in (("decode", prep.decode_s), ("teachers", timings["teachers_s"]),
                           ("encode", timings["encode_s"]), ("write", write_s)):
            m.stage_seconds(stage, sec)
        m.shard_committed()
        return {"shard": prep.shard, "rows": table.num_rows, "quarantined": quarantine.num_rows,
                "reasons": json.dumps(dict(_Counter(quarantine.column("reason").to_pylist()))),
                "decode_s": prep.decode_s, "teachers_s": timings["teachers_s"], "encode_s": timings["encode_s"],
                "write_s": write_s, "teacher_s": json.dumps(timings["teachers"]), "pid": os.getpid(),
                "decoded_here": prep.decode_pid == os.getpid(), "actor_ready_at": self.ready_at,
                "actor_init_s": self.init_s, "committed_at": time.time(), "actor_timeline": self.timeline,
                "peak_rss_mb": peak_rss_mb(), "cpu_s": time.process_time() - cpu0}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB; ``getrusage`` high-water mark, one syscall):
    each teacher actor reports it with every shard, so a run shows whether an actor's memory grows
    with the number of images (it must not: shards stream through)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


SUMMARY_SCHEMA = pa.schema([("shard", pa.int64()), ("rows", pa.int64()), ("quarantined", pa.int64()),
                            ("reasons", pa.string()), ("decode_s", pa.float64()), ("teachers_s", pa.float64()),
                            ("encode_s", pa.float64()), ("write_s", pa.float64()), ("teacher_s", pa.string()),
                            ("pid", pa.int64()), ("decoded_here", pa.bool_()), ("actor_ready_at", pa.float64()),
                            ("actor_init_s", pa.float64()), ("committed_at", pa.float64()),
                            ("actor_timeline", pa.list_(pa.float64())), ("peak_rss_mb", pa.float64()),
                            ("cpu_s", pa.float64())])


# ----------------------------------------------------------------------------- the run


class LabelRun:
    """Everything a labelling run decides before any work: input, teachers (resolved, hashed),
    provenance, and (:meth:`open`) the plan. ``jobs/label.py`` builds it before starting Ray so a
    missing teacher or input fails fast."""

    def __init__(self, cfg: Config, input_uri: Optional[str] = None, output: Optional[str] = None):
        from must_ray.label.teachers import resolve_teachers

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
        self.identity = {
            "input": self.input.describe(),
            "tasks": list(self.tasks),
            "teachers": [s.provenance() for s in self.specs],
            "thresholds": {t: config_to_dict(cfg.tasks[t]) for t in self.tasks if t in cfg.tasks},
            "classes": list(self.classes),
            "image_size": self.image_size,
            "shard_size": cfg.label.shard_size,
            "max_image_pixels": cfg.label.max_image_pixels,
            "max_file_bytes": cfg.label.max_file_bytes,
            "extensions": sorted(e.lower().lstrip(".") for e in cfg.label.extensions),
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
        self.ignored = 0

    def open(self) -> pa.Table:
        """Create or resume the output; returns the plan. Raises ConfigError when the output holds
        a run with other settings."""
        if self.cfg.label.overwrite:
            self.store.clear()
        previous = self.store.read_run()
        plan = self.store.read_plan() if previous else None
        if previous is not None and plan is not None:
            diffs = [k for k in RESUME_KEYS if _canon(previous.get(k)) != _canon(self.identity.get(k))]
            if diffs:
                raise ConfigError(
                    f"label.output {self.output} already holds a labelling run with other settings "
                    f"(differs: {', '.join(diffs)}); resume it with the same settings, choose a new --output, "
                    f"or --set label.overwrite=true to start over")
            self.ignored = int(previous.get("ignored_files", 0))
            self.store.makedirs()
            return plan
        listing = list_inputs(self.cfg, self.input)
        if not listing.image_id:
            raise ConfigError(f"--input {self.input.uri}: nothing to label (no images"
                              + (f"; {listing.ignored} files with other extensions than label.extensions" if listing.ignored else "")
                              + ")")
        plan = plan_table(listing, self.cfg.label.shard_size)
        self.ignored = listing.ignored
        self.store.makedirs()
        self.store.write_plan(plan)  # plan before run.json: run.json present => plan complete
        self.store.write_run({**self.identity, "ignored_files": listing.ignored, "num_inputs": plan.num_rows,
                              "num_shards": int(plan.column("shard").to_numpy().max()) + 1})
        return plan


def decode_memory_bytes(cfg: Config) -> int:
    """Heap memory one decode task reserves: a shard's pixels a few times over (decoded original,
    resized copy, Arrow row) plus a base. Besides keeping big shards from overcommitting a node,
    this reservation makes the decode tasks' resources differ from the teacher actors', which is
    what stops Ray Data from fusing the decode step *into* the actors (it fuses a task map into a
    following actor map when both reserve the same resources): decoding shard k+1 must overlap the
    teachers on shard k, not run inside the actor between them."""
    s = label_image_size(cfg)
    return int(64 * 2**20 + 4 * cfg.label.shard_size * s * s * 3)


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def run_labeling(cfg: Config, input_uri: Optional[str] = None, output: Optional[str] = None,
                 log_every_s: float = 10.0, run: Optional[LabelRun] = None) -> dict[str, Any]:
    """Label ``input_uri`` (default ``label.input``, else the world's unlabeled split) into
    ``output`` (default ``label.output``, else ``<paths.root>/<paths.labels>``) with Ray Data,
    resuming a previous run into the same output. Needs a connected Ray. Returns the summary.
    ``run``: an already resolved :class:`LabelRun` (the job resolves it before starting Ray)."""
    import ray

    t_start = time.perf_counter()
    run = run or LabelRun(cfg, input_uri, output)
    plan = run.open()
    store = run.store
    store.clean_tmp()
    num_shards = int(plan.column("shard").to_numpy().max()) + 1
    committed = store.committed_shards()
    pending = [s for s in range(num_shards) if s not in committed]
    descs = shard_descriptors(plan, pending)
    pending_images = sum(len(d["image_id"]) for d in descs)
    log.info("labelling %s -> %s: %d inputs in %d shards (%d already committed, %d shards / %d images to do), "
             "tasks %s", run.input.uri, run.output, plan.num_rows, num_shards, len(committed), len(pending),
             pending_images, ", ".join(run.tasks))

    stats = {"rows": 0, "quarantined": 0, "decode_s": 0.0, "teachers_s": 0.0, "encode_s": 0.0, "write_s": 0.0}
    teacher_s: dict[str, float] = {}
    reasons: _Counter = _Counter()
    actors: dict[int, tuple[float, float]] = {}  # pid -> (ready at, init seconds)
    decoded_in_actor = 0
    timelines: dict[int, list[float]] = {}
    peak_rss: dict[int, float] = {}  # pid -> the actor's peak RSS (MiB) at its last commit
    actor_cpu_s = 0.0  # CPU seconds the actor processes spent on the shards (teachers, encoding, commit)
    commits: list[tuple[float, int]] = []  # (epoch seconds, images) per committed shard
    t_pipe = time.perf_counter()
    t_pipe_epoch = time.time()
    if descs:
        lc = cfg.label
        specs = []
        for s in run.specs:  # weights travel once through the object store, not in every actor's args
            s2 = type(s)(**{**s.__dict__})
            s2.blob = ray.put(s.blob) if s.blob is not None else None
            specs.append(s2)
        max_actors = min(lc.actors[1], len(descs))
        ds = ray.data.from_items(descs, override_num_blocks=len(descs))
        ds = ds.map_batches(decode_shards, fn_kwargs={"ctx": run.prepare_ctx}, batch_size=1, batch_format="pyarrow",
                            num_cpus=lc.decode_num_cpus, memory=decode_memory_bytes(cfg))
        ds = ds.map_batches(
            ShardLabeler,
            fn_constructor_kwargs={"cfg_dict": config_to_dict(cfg), "specs": specs, "classes": run.classes,
                                   "tasks": run.tasks, "image_size": run.image_size, "provenance": run.provenance,
                                   "output": run.output},
            batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=min(lc.actors[0], max_actors), max_size=max_actors),
            num_cpus=lc.num_cpus_per_actor, num_gpus=lc.num_gpus_per_actor or None,
        )  # Ray Data restarts a crashed actor and retries its shard (max_restarts=-1): commits are idempotent
        done_shards, done_images, last_log = 0, 0, time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                done_shards += 1
                done_images += row["rows"] + row["quarantined"]
                for k in stats:
                    stats[k] += row[k]
                reasons.update(json.loads(row["reasons"]))
                actors[row["pid"]] = (row["actor_ready_at"], row["actor_init_s"])
                timelines[row["pid"]] = row["actor_timeline"]
                peak_rss[row["pid"]] = max(peak_rss.get(row["pid"], 0.0), row["peak_rss_mb"])
                actor_cpu_s += row["cpu_s"]
                decoded_in_actor += int(row["decoded_here"])
                commits.append((row["committed_at"], row["rows"] + row["quarantined"]))
                for name, sec in json.loads(row["teacher_s"]).items():
                    teacher_s[name] = teacher_s.get(name, 0.0) + sec
            now = time.perf_counter()
            if now - last_log >= log_every_s or done_shards == len(descs):
                rate = done_images / max(now - t_pipe, 1e-9)
                print(f"[label] {done_shards}/{len(descs)} shards, {done_images}/{pending_images} images this run, "
                      f"{rate:.1f} images/s", file=sys.stderr, flush=True)
                last_log = now
    pipe_s = time.perf_counter() - t_pipe
    counts = store.verify(plan)  # exactly once: one row (written or quarantined) per planned input id
    store.clean_tmp()
    if not counts["quarantined"]:
        store.remove_empty_quarantine()
    quarantine_reasons = _quarantine_reasons(store)
    summary = {
        "job": "label",
        "output": run.output,
        "quarantine": store.quarantine_uri if counts["quarantined"] else None,
        "input": run.input.uri,
        "input_kind": run.input.kind,
        "inputs": counts["inputs"],
        "rows": counts["rows"],
        "quarantined": counts["quarantined"],
        "quarantine_reasons": quarantine_reasons,
        "ignored_files": run.ignored,
        "tasks": run.tasks,
        "teachers": {t: {"name": s.name, "kind": s.kind, "sha256": s.sha256} for s in run.specs for t in s.tasks},
        "shards": num_shards,
        "shards_skipped": len(committed),
        "shards_labeled": len(pending),
        "images_this_run": pending_images,
        "images_per_s": round(pending_images / pipe_s, 2) if pending_images else 0.0,
        "pipeline_s": round(pipe_s, 2),
        "total_s": round(time.perf_counter() - t_start, 2),
        "stage_s": {k: round(v, 2) for k, v in stats.items() if k.endswith("_s")},
        "teacher_s": {k: round(v, 2) for k, v in teacher_s.items()},
        "actors_used": len(actors),
        # fixed cost of the run: the first actor's start (process, imports, teachers) from pipeline start
        "actor_start_s": round(min(r for r, _ in actors.values()) - t_pipe_epoch, 2) if actors else None,
        "actor_init_s": round(max(i for _, i in actors.values()), 2) if actors else None,
        # first actor, seconds after the pipeline started: process up, imports done, teachers built
        "actor_timeline_s": _timeline(timelines, t_pipe_epoch),
        # steady state: images per second from the first actor being ready to the last commit
        "steady_images_per_s": _steady_rate(actors, commits),
        "shards_decoded_in_actor": decoded_in_actor,  # 0: decode ran in its own tasks, overlapped
        "actor_peak_rss_mb": max(peak_rss.values()) if peak_rss else None,  # the largest teacher actor's peak RSS
        "actor_cpu_s": round(actor_cpu_s, 2),  # vs pipeline_s x actors: CPU the actors got (contention shows here)
    }
    assert summary["rows"] + summary["quarantined"] == summary["inputs"], summary
    store.write_success(summary)
    return summary


def _timeline(timelines: dict, t0: float) -> Optional[dict[str, float]]:
    if not timelines:
        return None
    started, imp0, imp1, init0, ready = min(timelines.values(), key=lambda t: t[-1])
    return {"process_started": round(started - t0, 2), "imports_began": round(imp0 - t0, 2),
            "imports_done": round(imp1 - t0, 2), "teachers_built": round(ready - t0, 2),
            "constructor_began": round(init0 - t0, 2)}


def _steady_rate(actors: dict, commits: list) -> Optional[float]:
    if not actors or not commits:
        return None
    start = min(r for r, _ in actors.values())
    end = max(t for t, _ in commits)
    return round(sum(n for _, n in commits) / max(end - start, 1e-9), 2)


def _quarantine_reasons(store: OutputStore) -> dict[str, int]:
    import pyarrow.parquet as pq

    c: _Counter = _Counter()
    for f in store.quarantine_files():
        c.update(pq.read_table(f, columns=["reason"], filesystem=store.fs).column("reason").to_pylist())
    return dict(sorted(c.items()))


__all__ = ["run_labeling", "label_shard", "ShardLabeler", "LabelRun", "label_tasks",
           "label_image_size", "label_output"]
