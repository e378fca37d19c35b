"""Custom Ray metrics for the dashboard / Prometheus (``ray.util.metrics``), usable from any
worker, actor or driver.

Every metric the project exports is declared once in :data:`METRICS` (name, kind, description,
tag keys); :class:`LabelMetrics` (the labeller's actors) and :class:`TrainMetrics` (rank 0 of a
Ray Train run) update them, and ``cluster/grafana/must_ray_dashboard.json`` may only query names
declared here (``tests/test_metrics_export.py`` checks it, so the two cannot drift). Generic
helpers — :func:`counter`, :func:`gauge`, :func:`histogram` — return one cached metric object per
process and name.

Cost outside Ray: nothing to speak of. Without an initialised Ray in the process (a plain PyTorch
loop, a unit test) every metric is a no-op object; Ray is not even imported for the check.

Naming: Ray's Prometheus exporter prefixes ``ray_`` and gives counters a ``_total`` suffix, so the
counter ``must_ray_images_labeled`` is scraped as ``ray_must_ray_images_labeled_total``; a histogram
``must_ray_teacher_batch_latency_s`` as ``ray_must_ray_teacher_batch_latency_s_bucket/_sum/_count``
(:meth:`MetricSpec.prometheus_names`). Metrics are exported by each node's metrics agent
(``ray start --metrics-export-port``) every ``metrics_report_interval_ms`` (10 s by default); a
gauge disappears from the endpoint ~2 intervals after the process that set it exits, counters and
histograms stay. Details and PromQL: docs/monitoring.md.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

LATENCY_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PROMETHEUS_PREFIX = "ray_"

_LOCK = threading.Lock()
_METRICS: dict[str, Any] = {}


class _NoOp:
    """Stands in for a metric outside Ray."""

    def inc(self, value: float = 1.0, tags: Optional[dict] = None) -> None:
        pass

    def set(self, value: float, tags: Optional[dict] = None) -> None:
        pass

    def observe(self, value: float, tags: Optional[dict] = None) -> None:
        pass


def _in_ray() -> bool:
    ray = sys.modules.get("ray")  # not imported -> certainly not initialised (and no import cost)
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized())
    except Exception:  # noqa: BLE001
        return False


def _get(kind: str, name: str, description: str, tag_keys: Sequence[str], **kwargs: Any) -> Any:
    if not _in_ray():
        return _NoOp()
    key = f"{kind}:{name}"
    with _LOCK:
        metric = _METRICS.get(key)
        if metric is None:
            from ray.util import metrics

            cls = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}[kind]
            metric = cls(name, description=description, tag_keys=tuple(tag_keys), **kwargs)
            _METRICS[key] = metric
        return metric


def counter(name: str, description: str = "", tag_keys: Sequence[str] = ()) -> Any:
    """A monotonically increasing count (``.inc(value, tags)``)."""
    return _get("counter", name, description, tag_keys)


def gauge(name: str, description: str = "", tag_keys: Sequence[str] = ()) -> Any:
    """A value that goes up and down (``.set(value, tags)``)."""
    return _get("gauge", name, description, tag_keys)


def histogram(name: str, description: str = "", boundaries: Sequence[float] = LATENCY_BUCKETS_S,
              tag_keys: Sequence[str] = ()) -> Any:
    """A distribution (``.observe(value, tags)``) over the bucket ``boundaries``."""
    return _get("histogram", name, description, tag_keys, boundaries=list(boundaries))


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: what :func:`counter` / :func:`gauge` / :func:`histogram` get called with."""

    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = LATENCY_BUCKETS_S  # histograms only

    def metric(self) -> Any:
        """The metric object of this process (a no-op outside Ray)."""
        if self.kind == "histogram":
            return histogram(self.name, self.description, self.boundaries, self.tags)
        return {"counter": counter, "gauge": gauge}[self.kind](self.name, self.description, self.tags)

    def prometheus_names(self) -> tuple[str, ...]:
        """The series names on a node's ``/metrics`` endpoint."""
        base = PROMETHEUS_PREFIX + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


_RUN = ("run", "role")
METRICS: dict[str, MetricSpec] = {s.name: s for s in (
    # --------------------------------------------------------------- labelling (jobs/label.py)
    MetricSpec("must_ray_images_labeled", "counter", "images pseudo-labelled and committed", ("output",)),
    MetricSpec("must_ray_images_quarantined", "counter", "inputs quarantined (undecodable, too large ...)",
               ("output", "reason")),
    MetricSpec("must_ray_teacher_batch_latency_s", "histogram", "seconds one teacher takes for one batch",
               ("teacher",)),
    MetricSpec("must_ray_label_shard_s", "histogram", "seconds per shard and pipeline stage", ("stage",)),
    MetricSpec("must_ray_label_shards_committed", "counter", "shards committed", ("output",)),
    # --------------------------------------------------------------- training (rank 0 of a Ray Train run)
    MetricSpec("must_ray_train_steps", "counter", "optimiser steps trained", _RUN),
    MetricSpec("must_ray_train_loss", "gauge", "weighted total loss, mean over the last report window", _RUN),
    MetricSpec("must_ray_train_task_loss", "gauge", "per-task loss, mean over the last report window "
               "(labelled rows only)", _RUN + ("task",)),
    MetricSpec("must_ray_train_images_per_s", "gauge", "training images per second over all workers, "
               "last report window", _RUN),
    MetricSpec("must_ray_train_data_wait_frac", "gauge", "fraction of the last report window the workers "
               "waited for input batches", _RUN),
    MetricSpec("must_ray_train_seconds_since_checkpoint", "gauge", "seconds since the run's last checkpoint "
               "(or since this worker group started), at the last report", _RUN),
    MetricSpec("must_ray_train_last_checkpoint_time_s", "gauge", "unix time of the run's last checkpoint "
               "(or of this worker group's start)", _RUN),
)}


class LabelMetrics:
    """The labeller's metrics, updated by the teacher actors as shards commit:

    * ``must_ray_images_labeled`` (counter, tag ``output``): rows written;
    * ``must_ray_images_quarantined`` (counter, tags ``output``, ``reason``): inputs quarantined;
    * ``must_ray_teacher_batch_latency_s`` (histogram, tag ``teacher``): seconds per teacher per batch;
    * ``must_ray_label_shard_s`` (histogram, tag ``stage``: decode / teachers / encode / write);
    * ``must_ray_label_shards_committed`` (counter, tag ``output``).

    Images labelled per second is ``rate()`` of the counter (docs/monitoring.md).
    """

    def __init__(self, output: str = ""):
        self.output = output
        self.labeled = METRICS["must_ray_images_labeled"].metric()
        self.quarantined = METRICS["must_ray_images_quarantined"].metric()
        self.latency = METRICS["must_ray_teacher_batch_latency_s"].metric()
        self.stage = METRICS["must_ray_label_shard_s"].metric()
        self.shards = METRICS["must_ray_label_shards_committed"].metric()

    def teacher_batch(self, teacher: str, seconds: float) -> None:
        """One teacher's seconds on one mini-batch."""
        self.latency.observe(seconds, {"teacher": teacher})

    def shard_committed(self, rows: int, quarantined: Mapping[str, int], stage_seconds: Mapping[str, float]) -> None:
        """One committed shard: ``rows`` written, inputs quarantined by reason, seconds per stage."""
        if rows:
            self.labeled.inc(rows, {"output": self.output})
        for reason, n in quarantined.items():
            if n:
                self.quarantined.inc(n, {"output": self.output, "reason": reason})
        for stage, seconds in stage_seconds.items():
            self.stage.observe(seconds, {"stage": stage})
        self.shards.inc(1, {"output": self.output})


class TrainMetrics:
    """A Ray Train run's metrics, set by the rank-0 worker at every report (every
    ``report_every_steps``). Rank 0 alone: the values it reports are already all-reduced over the
    group (global loss, global images/s), so one series per run is the whole truth and the
    dashboard needs no aggregation over workers. Tags: ``run`` (the run name), ``role``
    (teacher / student), and ``task`` for the per-task loss.

    * ``must_ray_train_steps`` (counter): optimiser steps; ``rate()`` = steps/s;
    * ``must_ray_train_loss``, ``must_ray_train_task_loss{task}`` (gauges): window means;
    * ``must_ray_train_images_per_s``, ``must_ray_train_data_wait_frac`` (gauges);
    * ``must_ray_train_seconds_since_checkpoint`` (gauge, at each report: the training a crash would
      lose right now) and ``must_ray_train_last_checkpoint_time_s`` (gauge, unix time: alert on
      ``time() - ...``, which keeps growing even when the reports stop).
    """

    def __init__(self, run: str, role: str, start_time: Optional[float] = None):
        self.tags = {"run": run, "role": role}
        self.last_checkpoint = time.time() if start_time is None else start_time
        self.steps = METRICS["must_ray_train_steps"].metric()
        self.loss = METRICS["must_ray_train_loss"].metric()
        self.task_loss = METRICS["must_ray_train_task_loss"].metric()
        self.images_per_s = METRICS["must_ray_train_images_per_s"].metric()
        self.data_wait = METRICS["must_ray_train_data_wait_frac"].metric()
        self.since_checkpoint = METRICS["must_ray_train_seconds_since_checkpoint"].metric()
        self.checkpoint_time = METRICS["must_ray_train_last_checkpoint_time_s"].metric()
        self.checkpoint_time.set(self.last_checkpoint, self.tags)

    def report(self, metrics: Mapping[str, Any], tasks: Sequence[str], steps: int) -> None:
        """One report's values (the dict the loop passes to ``ray.train.report``) and the steps
        trained since the previous report."""
        if steps:
            self.steps.inc(steps, self.tags)
            self.loss.set(float(metrics["loss"]), self.tags)
            self.images_per_s.set(float(metrics["images_per_s"]), self.tags)
            self.data_wait.set(float(metrics["data_wait_frac"]), self.tags)
            for task in tasks:
                value = metrics.get(f"loss_{task}")
                if value is not None:  # no labelled row of the task in the window: keep the last value
                    self.task_loss.set(float(value), {**self.tags, "task": task})
        self.since_checkpoint.set(time.time() - self.last_checkpoint, self.tags)

    def checkpointed(self) -> None:
        """A checkpoint was just reported (and persisted) by this worker."""
        self.last_checkpoint = time.time()
        self.since_checkpoint.set(0.0, self.tags)
        self.checkpoint_time.set(self.last_checkpoint, self.tags)


__all__ = ["counter", "gauge", "histogram", "MetricSpec", "METRICS", "LabelMetrics", "TrainMetrics",
           "LATENCY_BUCKETS_S", "PROMETHEUS_PREFIX"]
