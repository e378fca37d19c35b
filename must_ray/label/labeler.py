"""The teacher actor of a labelling run: every teacher on a decoded shard, the label cells encoded,
the shard committed (``store.OutputStore.commit_shard``), one report row back to the driver.

:func:`label_shard` is the per-shard work without Ray or a store (the benchmarks' plain loop runs
the same per-image functions); :class:`ShardLabeler` is the ``map_batches`` callable class around
it. A report (:data:`REPORT_SCHEMA`) says what the shard was (rows, quarantined, reasons), where its
time went (decode / teachers / encode / write seconds, per teacher) and what it cost the actor
(process, CPU seconds, peak RSS, when the actor was up) and whether it is a retry (the node of an
earlier attempt in this run, lost mid-shard): cheap facts, read once per shard; the driver sums
what the summary needs and hands every report to an optional observer.
"""
from __future__ import annotations

import time

_IMPORT_STARTED = time.time()  # actor start-up facts: when this module began importing (torch ...)

import json
import os
import resource
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import pyarrow as pa
import torch

from must_ray.config import Config, config_from_dict
from must_ray.label.inputs import PreparedShard
from must_ray.label.store import QUARANTINE_SCHEMA, OutputStore
from must_ray.label.teachers import TeacherSet
from must_ray.monitoring import LabelMetrics
from must_ray.table import examples_schema
from must_ray.tasks import Task, build_tasks

_IMPORTED = time.time()

REPORT_SCHEMA = pa.schema([("shard", pa.int64()), ("rows", pa.int64()), ("quarantined", pa.int64()),
                           ("reasons", pa.string()), ("decode_s", pa.float64()), ("teachers_s", pa.float64()),
                           ("encode_s", pa.float64()), ("write_s", pa.float64()), ("teacher_s", pa.string()),
                           ("pid", pa.int64()), ("decoded_here", pa.bool_()), ("actor_ready_at", pa.float64()),
                           ("actor_init_s", pa.float64()), ("committed_at", pa.float64()),
                           ("actor_timeline", pa.list_(pa.float64())), ("peak_rss_mb", pa.float64()),
                           ("cpu_s", pa.float64()), ("retry_of_node", pa.string())])


def torch_threads(cfg: Config) -> int:
    """Intra-op torch threads of one actor: ``label.torch_threads``, else its CPUs rounded."""
    return int(cfg.label.torch_threads or max(1, round(cfg.label.num_cpus_per_actor)))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB; ``getrusage`` high-water mark, one syscall):
    each teacher actor reports it with every shard, so a run shows whether an actor's memory grows
    with the number of images (it must not: shards stream through)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def process_started() -> float:
    """When this process started (epoch seconds; psutil's record when it is installed, else when
    this module began importing)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a start-up fact, not worth failing an actor for
        return _IMPORT_STARTED


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


def quarantine_rows(prep: PreparedShard) -> pa.Table:
    """The quarantine rows of ``prep``'s bad inputs (id, locator, source, reason, detail, shard)."""
    bad = [i for i, r in enumerate(prep.reason) if r]
    return pa.Table.from_pydict({
        "image_id": [prep.image_id[i] for i in bad], "path": [prep.locator[i] for i in bad],
        "source": [prep.source[i] for i in bad], "reason": [prep.reason[i] for i in bad],
        "detail": [prep.detail[i] for i in bad], "shard": [prep.shard] * len(bad)}, schema=QUARANTINE_SCHEMA)


def label_shard(prep: PreparedShard, teachers: TeacherSet, tasks: dict[str, Task], schema: pa.Schema,
                batch_size: int, metrics: Optional[LabelMetrics] = None,
                executor: Optional[ThreadPoolExecutor] = None) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """All teachers on the good images of ``prep`` (mini-batches of ``batch_size``), label cells
    encoded. Returns ``(examples table rows, quarantine rows, timings)``.

    With an ``executor`` (a thread pool), batch i is encoded (PNG: zlib releases the GIL) while the
    teachers run on batch i+1; without one, encoding follows inference inline."""
    per_teacher: Counter = Counter()
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
        per_teacher.update(batch_t)
        if metrics is not None:
            for name, sec in batch_t.items():
                metrics.teacher_batch(name, sec)
    t_wait = time.perf_counter()
    parts = [p.result() if hasattr(p, "result") else p for p in parts]
    encode_wait_s = time.perf_counter() - t_wait
    cols = {n: [v for c, _ in parts for v in c[n]] for n in names}
    table = pa.Table.from_pydict(cols, schema=schema)
    # encode_s: encoding work (overlapped with the teachers when threaded); label_s: the shard's wall time
    timings = {"teachers": dict(per_teacher), "teachers_s": teachers_s, "encode_s": sum(sec for _, sec in parts),
               "encode_wait_s": encode_wait_s, "label_s": time.perf_counter() - t_start}
    return table, quarantine_rows(prep), timings


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class ShardLabeler:
    """The teacher actor (``map_batches`` callable class): builds every teacher once, then per
    prepared shard runs them all, encodes and commits. Returns one report row per shard."""

    def __init__(self, cfg_dict: dict, specs: list, classes: list[str], tasks: list[str], image_size: int,
                 provenance: dict, output: str, device: Optional[str] = None, files_per_dir: int = 0):
        t0 = time.time()
        cfg = config_from_dict(cfg_dict)
        torch.set_num_threads(torch_threads(cfg))
        if device is None:
            device = "cuda" if cfg.label.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.batch_size = cfg.label.batch_size
        self.teachers = TeacherSet(specs, cfg, classes, image_size, device)
        self.tasks = build_tasks(tasks, len(classes), cfg.tasks)
        self.schema = examples_schema(tasks, provenance)
        self.store = OutputStore(output, files_per_dir)
        self.metrics = LabelMetrics(output)
        self.executor = None
        if cfg.label.encode_threads > 0:
            self.executor = ThreadPoolExecutor(cfg.label.encode_threads, thread_name_prefix="encode")
        self.node_id = _node_id()
        self.ready_at = time.time()  # epoch seconds: when this actor could label
        self.init_s = self.ready_at - t0
        # epoch seconds of: worker process start, imports begin/end, constructor begin/end
        self.timeline = [process_started(), _IMPORT_STARTED, _IMPORTED, t0, self.ready_at]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.label_and_commit(PreparedShard.from_arrow(batch, r)) for r in range(batch.num_rows)]
        return pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)

    def label_and_commit(self, prep: PreparedShard) -> dict[str, Any]:
        """Label ``prep``, commit it, update the metrics; the shard's report row."""
        cpu0 = time.process_time()  # the actor process's CPU seconds (all its threads) for this shard
        retry_of_node = self.store.start_attempt(prep.shard, self.node_id)
        table, quarantine, timings = label_shard(prep, self.teachers, self.tasks, self.schema, self.batch_size,
                                                 self.metrics, self.executor)
        t0 = time.perf_counter()
        self.store.commit_shard(prep.shard, table, quarantine)
        write_s = time.perf_counter() - t0
        reasons = Counter(quarantine.column("reason").to_pylist())
        stages = {"decode": prep.decode_s, "teachers": timings["teachers_s"], "encode": timings["encode_s"],
                  "write": write_s}
        self.metrics.shard_committed(table.num_rows, reasons, stages)
        return {"shard": prep.shard, "rows": table.num_rows, "quarantined": quarantine.num_rows,
                "reasons": json.dumps(dict(reasons)), **{f"{stage}_s": sec for stage, sec in stages.items()},
                "teacher_s": json.dumps(timings["teachers"]), "pid": os.getpid(),
                "decoded_here": prep.decode_pid == os.getpid(), "actor_ready_at": self.ready_at,
                "actor_init_s": self.init_s, "committed_at": time.time(), "actor_timeline": self.timeline,
                "peak_rss_mb": peak_rss_mb(), "cpu_s": time.process_time() - cpu0, "retry_of_node": retry_of_node}


__all__ = ["ShardLabeler", "label_shard", "quarantine_rows", "torch_threads", "peak_rss_mb", "REPORT_SCHEMA"]
