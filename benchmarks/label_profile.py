"""The labelling benchmarks' view of a run: a :class:`~must_ray.label.run.RunObserver` that reads
every committed shard's report and adds the figures a benchmark needs beyond the job's summary —
the actor's start-up timeline, whether decoding stayed out of the actors, the actors' peak
memory and CPU seconds. The production job computes none of them."""
from __future__ import annotations

from typing import Any, Optional

from must_ray.config import Config
from must_ray.label.run import RunObserver, run_labeling


class LabelProfile(RunObserver):
    """Pass one to ``run_labeling(..., observer=profile)``, then read :meth:`figures`."""

    def __init__(self) -> None:
        self.started_at: Optional[float] = None
        self.actors: dict[int, tuple[float, float]] = {}  # pid -> (ready at, constructor seconds)
        self.timelines: dict[int, list[float]] = {}  # pid -> actor start-up timeline (epoch seconds)
        self.peak_rss: dict[int, float] = {}  # pid -> the actor's peak RSS (MiB) at its last commit
        self.cpu_s = 0.0  # CPU seconds the actor processes spent on the shards (teachers, encoding, commit)
        self.decoded_in_actor = 0
        self.rows: dict[int, int] = {}  # pid -> images (rows and quarantined) its shards held
        self.last_commit: dict[int, float] = {}  # pid -> epoch second of its last commit

    def pipeline_started(self, epoch_s: float) -> None:
        self.started_at = epoch_s

    def shard_committed(self, report: dict[str, Any]) -> None:
        pid = report["pid"]
        self.actors[pid] = (report["actor_ready_at"], report["actor_init_s"])
        self.timelines[pid] = report["actor_timeline"]
        self.peak_rss[pid] = max(self.peak_rss.get(pid, 0.0), report["peak_rss_mb"])
        self.cpu_s += report["cpu_s"]
        self.decoded_in_actor += int(report["decoded_here"])
        self.rows[pid] = self.rows.get(pid, 0) + report["rows"] + report["quarantined"]
        self.last_commit[pid] = max(self.last_commit.get(pid, 0.0), report["committed_at"])

    def pool_rate(self) -> Optional[float]:
        """The pool's images/s at full strength: each actor's images over its own window (ready to
        last commit), summed. Unlike the run's steady rate (from the *first* actor being ready), it
        does not count the later actors' start-up against the pool, which a long run amortises."""
        windows = {pid: self.last_commit[pid] - ready for pid, (ready, _) in self.actors.items()}
        if not windows or min(windows.values()) <= 0:
            return None
        return round(sum(self.rows[pid] / w for pid, w in windows.items()), 2)

    def figures(self) -> dict[str, Any]:
        """The run's benchmark figures (None where no shard was labelled)."""
        t0 = self.started_at or 0.0
        first_ready = min((r for r, _ in self.actors.values()), default=None)
        return {
            "actors_used": len(self.actors),
            # fixed cost of the run: the first actor's start (process, imports, teachers) from pipeline start
            "actor_start_s": round(first_ready - t0, 2) if first_ready is not None else None,
            "actor_init_s": round(max(i for _, i in self.actors.values()), 2) if self.actors else None,
            # first actor, seconds after the pipeline started: process up, imports done, teachers built
            "actor_timeline_s": self._timeline(t0),
            "shards_decoded_in_actor": self.decoded_in_actor,  # 0: decode ran in its own tasks, overlapped
            "actor_peak_rss_mb": max(self.peak_rss.values()) if self.peak_rss else None,  # the largest actor's
            "actor_cpu_s": round(self.cpu_s, 2),  # vs pipeline_s x actors: CPU the actors got (contention shows here)
            "pool_images_per_s": self.pool_rate(),
            "actor_ready_spread_s": round(max(r for r, _ in self.actors.values()) - first_ready, 2)
            if self.actors else None,  # the last actor's start-up after the first's
        }

    def _timeline(self, t0: float) -> Optional[dict[str, float]]:
        if not self.timelines:
            return None
        started, imp0, imp1, init0, ready = min(self.timelines.values(), key=lambda t: t[-1])
        return {"process_started": round(started - t0, 2), "imports_began": round(imp0 - t0, 2),
                "imports_done": round(imp1 - t0, 2), "teachers_built": round(ready - t0, 2),
                "constructor_began": round(init0 - t0, 2)}


def profiled_labeling(cfg: Config, image_dir: str, out_dir: str) -> dict[str, Any]:
    """``run_labeling`` of ``image_dir`` into ``out_dir`` (no progress lines) with a profile: the
    job's summary (its ``images_per_s`` is the steady rate, also as ``steady_images_per_s``) plus
    :meth:`LabelProfile.figures`."""
    profile = LabelProfile()
    summary = run_labeling(cfg, image_dir, out_dir, log_every_s=1e9, observer=profile)
    return {**summary, "steady_images_per_s": summary["images_per_s"], **profile.figures()}


__all__ = ["LabelProfile", "profiled_labeling"]
