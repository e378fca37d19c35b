"""Custom Ray metrics for the dashboard / Prometheus (``ray.util.metrics``), usable from any
worker, actor or driver.

Generic helpers — :func:`counter`, :func:`gauge`, :func:`histogram` return one cached metric
object per process and name, and become silent no-ops outside Ray (so the same code runs in a
plain PyTorch loop or a unit test) — plus the labeller's metrics (:class:`LabelMetrics`). Other
components (the trainer) add theirs the same way::

    from must_ray import monitoring
    monitoring.counter("must_ray_train_steps", "optimizer steps").inc(1)
    monitoring.histogram("must_ray_step_s", "step time", LATENCY_BUCKETS_S, ("role",)).observe(0.2, {"role": "student"})

Naming: Ray's Prometheus exporter prefixes ``ray_`` and gives counters a ``_total`` suffix, so the
counter ``must_ray_images_labeled`` is scraped as ``ray_must_ray_images_labeled_total``; a histogram
``must_ray_teacher_batch_latency_s`` as ``ray_must_ray_teacher_batch_latency_s_bucket/_sum/_count``.
Metrics are exported by each node's metrics agent (``ray start --metrics-export-port``; the
dashboard's Metrics tab with Prometheus + Grafana set up shows them).
"""
from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

LATENCY_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

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
    try:
        import ray

        return ray.is_initialized()
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


class LabelMetrics:
    """The labeller's metrics, updated by the teacher actors as shards commit:

    * ``must_ray_images_labeled`` (counter, tag ``output``): rows written;
    * ``must_ray_images_quarantined`` (counter, tags ``output``, ``reason``): inputs quarantined;
    * ``must_ray_teacher_batch_latency_s`` (histogram, tag ``teacher``): seconds per teacher per batch;
    * ``must_ray_label_shard_s`` (histogram, tag ``stage``: decode / teachers / encode / write);
    * ``must_ray_label_shards_committed`` (counter, tag ``output``).
    """

    def __init__(self, output: str = ""):
        self.output = output
        self.labeled = counter("must_ray_images_labeled", "images pseudo-labelled and committed", ("output",))
        self.quarantined = counter("must_ray_images_quarantined", "inputs quarantined (undecodable, too large ...)",
                                   ("output", "reason"))
        self.latency = histogram("must_ray_teacher_batch_latency_s", "seconds one teacher takes for one batch",
                                 LATENCY_BUCKETS_S, ("teacher",))
        self.stage = histogram("must_ray_label_shard_s", "seconds per shard and pipeline stage", LATENCY_BUCKETS_S,
                               ("stage",))
        self.shards = counter("must_ray_label_shards_committed", "shards committed", ("output",))

    def images_labeled(self, n: int) -> None:
        if n:
            self.labeled.inc(n, {"output": self.output})

    def images_quarantined(self, n: int, reason: str) -> None:
        if n:
            self.quarantined.inc(n, {"output": self.output, "reason": reason})

    def teacher_batch(self, teacher: str, seconds: float) -> None:
        self.latency.observe(seconds, {"teacher": teacher})

    def stage_seconds(self, stage: str, seconds: float) -> None:
        self.stage.observe(seconds, {"stage": stage})

    def shard_committed(self) -> None:
        self.shards.inc(1, {"output": self.output})


__all__ = ["counter", "gauge", "histogram", "LabelMetrics", "LATENCY_BUCKETS_S"]
