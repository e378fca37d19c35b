"""The project's progress lines: ``[tag] done/total unit, rate unit/s, ETA``, on stderr, at most
every few seconds and once at the end.

:class:`ProgressLine` is the line itself (the labeller's shard tally prints through it).
:class:`RayDataProgress` draws one for every Ray Data execution the driver runs (world rendering,
evaluation, transfer features, imports, exports), from the executor's own row counts, so no step
is silent while Ray's own progress bars are off (:mod:`must_ray.ray_logs`). The tag names the
running step or job (:func:`progress_tag`). Importing this module imports no Ray.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from typing import Any, Iterator, Optional

_TAG: contextvars.ContextVar[tuple[str, bool, Optional[int]]] = contextvars.ContextVar(
    "must_ray_progress_tag", default=("", True, None))


@contextlib.contextmanager
def progress_tag(tag: str, ray_data: bool = True, rows: Optional[int] = None) -> Iterator[None]:
    """Name the progress lines drawn inside the block (a pipeline step, a job); ``ray_data=False``
    for work that draws its own line (the labeller), so its Ray Data execution draws none;
    ``rows``: the rows the block's Ray Data execution produces, when known up front (better
    than Ray's estimate, which exists only once a task finished)."""
    token = _TAG.set((tag, ray_data, rows))
    try:
        yield
    finally:
        _TAG.reset(token)


def current_tag(default: str = "data") -> str:
    """The tag set by the innermost :func:`progress_tag` (``default`` outside any)."""
    return _TAG.get()[0] or default


def show_ray_data_progress() -> None:
    """Draw a :class:`RayDataProgress` line for every Ray Data execution of this driver."""
    from ray.data import DataContext

    RayDataProgress.driver_pid = os.getpid()
    callbacks = DataContext.get_current().custom_execution_callback_classes
    if RayDataProgress not in callbacks:
        callbacks.append(RayDataProgress)


def format_duration(seconds: float) -> str:
    """``"42s"``, ``"3m05s"``, ``"1h02m"``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_text(tag: str, done: int, total: Optional[int], unit: str, rate: float,
                  extra: str = "") -> str:
    """One progress line: counts, rate and (with a known total and a rate) the ETA."""
    counts = f"{done}/{total} {unit}" if total else f"{done} {unit}"
    eta = f", ETA {format_duration((total - done) / rate)}" if total and rate > 0 and done < total else ""
    return f"[{tag}] {counts}, {rate:.1f} {unit}/s{eta}{extra}"


class ProgressLine:
    """A throttled progress line: :meth:`update` with the count so far prints when ``every_s``
    passed since the last line; :meth:`finish` prints the last one."""

    def __init__(self, tag: str, total: Optional[int], unit: str, every_s: float = 5.0, stream=None):
        self.tag, self.total, self.unit, self.every_s = tag, total, unit, every_s
        self.stream = stream
        self.started = time.perf_counter()
        self.last = self.started
        self.done = 0

    def rate(self) -> float:
        """Units per second since the start."""
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def update(self, done: int, total: Optional[int] = None, rate: Optional[float] = None, extra: str = "") -> None:
        """Record ``done`` units (and a better ``total`` estimate); print when the interval passed."""
        self.done = done
        if total:
            self.total = total
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(rate, extra)

    def finish(self, extra: str = "") -> None:
        """Print the closing line (count, rate, elapsed time)."""
        self._print(None, f" in {format_duration(time.perf_counter() - self.started)}{extra}")

    def _print(self, rate: Optional[float], extra: str) -> None:
        line = progress_text(self.tag, self.done, self.total, self.unit, self.rate() if rate is None else rate, extra)
        print(line, file=self.stream or sys.stderr, flush=True)


class RayDataProgress:
    """A Ray Data execution callback (``DataContext.custom_execution_callback_classes``): a
    progress line per execution in the driver: the share done of its slowest operator (each
    operator's own estimate), the rows per second of its first one, and the ETA. Silent in other
    processes (e.g. a training run's data coordinator) and for executions that end within
    ``quiet_s`` seconds."""

    driver_pid: Optional[int] = None  # set by must_ray.ray_logs.quiet_ray in the driver
    every_s = 5.0
    quiet_s = 3.0

    def __init__(self) -> None:
        self.started: Optional[float] = None
        self.last = 0.0
        self.tag = ""
        self.rows: Optional[int] = None

    def before_execution_starts(self, executor: Any) -> None:
        if os.getpid() == self.driver_pid and _TAG.get()[1]:
            self.started = time.perf_counter()
            self.last = self.started + self.quiet_s - self.every_s
            self.tag, _, self.rows = _TAG.get()
            self.tag = self.tag or "data"

    def on_execution_step(self, executor: Any) -> None:
        now = time.perf_counter()
        if self.started is not None and now - self.last >= self.every_s:
            self.last = now
            self._print(executor, now)

    def after_execution_succeeds(self, executor: Any) -> None:
        now = time.perf_counter()
        if self.started is not None and now - self.started >= self.quiet_s:
            self._print(executor, now, final=True)
        self.started = None

    def after_execution_fails(self, executor: Any, error: Exception) -> None:
        self.started = None

    def _print(self, executor: Any, now: float, final: bool = False) -> None:
        done, total = execution_rows(executor)
        total = self.rows or total
        if total is not None and done > total:  # Ray's estimate before its first task finished
            total = None
        elapsed = max(now - (self.started or now), 1e-9)
        if final:
            text = f"[{self.tag}] {done} rows in {format_duration(elapsed)}, {done / elapsed:.1f} rows/s"
        else:
            text = progress_text(self.tag, done, total, "rows", done / elapsed)
        print(text, file=sys.stderr, flush=True)


def execution_rows(executor: Any) -> tuple[int, Optional[int]]:
    """``(rows that reached the last operator, rows the first one will produce)`` of a Ray Data
    streaming executor: rows through every stage but the last, out of its source's own estimate
    (None when unknown)."""
    ops = [op for op in list(getattr(executor, "_topology", None) or {}) if getattr(op, "input_dependencies", None)]
    if not ops:
        return 0, None
    last = ops[-1]
    done = int(getattr(last.metrics, "num_row_inputs_received", 0) or 0)
    if len(ops) == 1:
        done = int(getattr(last.metrics, "rows_task_outputs_generated", 0) or 0)
    return done, ops[0].num_output_rows_total()
