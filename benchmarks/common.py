"""What the benchmarks share: the machine description, target checks, medians, benchmark inputs
rendered from the synthetic world, and running a plain (no-Ray) loop as a fresh process at the
Ray workers' CPU priority, so both sides of a comparison get the same share of a busy machine."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Optional

from must_ray.config import Config, config_from_dict
from must_ray.typed_config import ConfigError, config_to_dict, deep_merge

OPS = {">=": lambda v, t: v >= t, "<": lambda v, t: v < t, "<=": lambda v, t: v <= t, ">": lambda v, t: v > t}


def check(name: str, value: Optional[float], op: Optional[str] = None, target: Optional[float] = None) -> dict[str, Any]:
    """One figure against its target (``value op target``), as the docs table shows it; ``met`` is
    None when there is no value or no target (a figure that is only reported)."""
    met = None if value is None or op is None else bool(OPS[op](value, target))
    return {"name": name, "value": value, "op": op, "target": target, "met": met}


def median(values: Iterable[float], digits: int = 2) -> float:
    """Rounded median (the figure each side of an ABBA benchmark reports)."""
    return round(statistics.median(list(values)), digits)


def positive(name: str, value: Any, minimum: float = 1) -> None:
    """Raise ConfigError naming ``name`` unless ``value >= minimum`` (bad sizes fail before any work)."""
    if value is None or value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a benchmark figure is only meaningful with: CPU model, cores, RAM, versions, load, date."""
    import ray
    import torch

    try:
        with open("/proc/meminfo") as f:
            mem_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        ram_gib = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        ram_gib = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(), "cores": cores, "ram_gib": ram_gib, "gpu": _gpu_name(torch),
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "os": f"{platform.system()} {platform.release()}", "loadavg_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _gpu_name(torch) -> Optional[str]:
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def ray_cpus() -> int:
    """Logical CPUs of the connected Ray cluster (the cores both sides of a comparison get)."""
    import ray

    return int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))


def ray_worker_niceness() -> int:
    """The scheduling niceness of Ray's worker processes (Ray starts them at nice 15 on Linux)."""
    import ray

    @ray.remote(num_cpus=0)
    def _nice() -> int:
        return os.nice(0)

    return int(ray.get(_nice.remote()))


def run_module(module: str, spec: dict[str, Any], threads: int, niceness: int = 0) -> dict[str, Any]:
    """``python -m <module> <spec.json>`` as a fresh process at ``niceness`` with
    ``OMP_NUM_THREADS=threads``; returns the JSON object of its last stdout line and adds
    ``process_s`` (its whole wall time, imports included). The module's ``__main__`` reads the spec
    and prints one JSON line."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        t0 = time.perf_counter()
        bump = max(0, niceness - os.nice(0))
        proc = subprocess.run([sys.executable, "-m", module, spec_path], capture_output=True, text=True, env=env,
                              preexec_fn=(lambda: os.nice(bump)) if bump else None)
        wall = time.perf_counter() - t0
    finally:
        os.unlink(spec_path)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = round(wall, 3)
    return result


def module_main(fn) -> None:
    """The ``__main__`` of a benchmark module run by :func:`run_module`: read the spec file named on
    the command line, call ``fn(spec)``, print its result as one JSON line."""
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    sys.stdout.write(json.dumps(fn(spec)) + "\n")


def with_overrides(cfg: Config, **sections: dict[str, Any]) -> Config:
    """``cfg`` with keys of its sections replaced, e.g. ``with_overrides(cfg, label={"actors": [2, 2]})``
    (nested mappings merge key by key: ``student={"scaling": {"cpus_per_worker": 2}}``); validated
    like a ``--set``."""
    data = config_to_dict(cfg)
    for section, keys in sections.items():
        data[section] = deep_merge(data[section], keys)
    return config_from_dict(data)


def world_table(cfg: Config, out_dir: str, num: int, split: str = "test") -> str:
    """Render ``num`` scenes of world split ``split`` (default ``test``: ground truth for all five
    tasks, i.e. a pseudo-label table's schema) in-process with the split renderer of
    ``must_ray.world.splits`` and write them as one Parquet file with the split's provenance (the
    class vocabulary the trainer sizes its heads from). In-process: no Ray start-up in the timing
    budget. Returns ``out_dir``."""
    from dataclasses import replace

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from must_ray.table import examples_schema
    from must_ray.world.splits import RenderBatch, split_provenance

    if split not in cfg.world.splits:
        raise ConfigError(f"world.splits: no split named {split!r}")
    sc = replace(cfg.world.splits[split], num=num)
    render = RenderBatch(cfg.world, sc, cfg.tasks)
    schema = examples_schema(sc.tasks, split_provenance(cfg.world, split, sc))
    step = max(1, cfg.world.render_batch)
    parts = [render({"id": np.arange(i, min(num, i + step))}).cast(schema) for i in range(0, num, step)]
    os.makedirs(out_dir, exist_ok=True)
    pq.write_table(pa.concat_tables(parts), os.path.join(out_dir, f"{split}-00000.parquet"))
    return out_dir


__all__ = ["check", "median", "positive", "machine_info", "cpu_model", "ray_cpus", "ray_worker_niceness",
           "run_module", "module_main", "with_overrides", "world_table"]
