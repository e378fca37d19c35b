"""What every job in ``jobs/`` shares: ``--config``/``--set``/``--verbose`` parsing, the flags
several jobs have, Ray start-up (quiet unless ``--verbose``), the closing table and JSON summary
line. Jobs stay thin: parse, call the library, print the summary.

This module is light on purpose (no torch, Ray or timm at import): ``--help`` of every job and
config errors come back in well under a second, before Ray starts."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from must_ray.config import Config, load_config
from must_ray.object_store import check_object_store_locations, worker_env_vars
from must_ray.progress import progress_tag, show_ray_data_progress
from must_ray.ray_logs import quiet_ray
from must_ray.storage import check_cluster_paths, check_job_output_paths, job_output_locations
from must_ray.typed_config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo.yaml"

log = logging.getLogger("must_ray")


def job_parser(description: str, epilog: str = "", config_flag: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the options every job has (``--config`` unless ``config_flag`` is
    false, ``--set``, ``--verbose``)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=(epilog + "\n\n" if epilog else "")
        + "Any config key can be overridden with --set dotted.key=value (repeatable), e.g.\n"
        "  --set paths.root=/data/run1 --set world.image_size=96\n"
        "The job's last stdout line is a JSON summary of what it wrote and its headline metrics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if config_flag:
        parser.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="PATH",
                            help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (dotted path; value parsed as YAML); repeatable")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own logs (Ray Data plans and progress dumps, Ray Train's reports)")
    return parser


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """The plain flags both training jobs share (each becomes a ``--set <role>.<key>=...``)."""
    parser.add_argument("--data", action="append", metavar="TABLE",
                        help="examples table (Parquet dir/file/URI) to train on; repeatable (tables are unioned, "
                             "missing task columns read as unlabelled)")
    parser.add_argument("--out", metavar="DIR", help="where model.pt, metrics.jsonl and summary.json go")
    parser.add_argument("--steps", type=int, metavar="N", help="optimiser steps (sets <role>.schedule.max_steps)")
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs when --steps is not given")
    parser.add_argument("--workers", metavar="MIN[,MAX]",
                        help="Ray Train workers; MIN,MAX makes the group elastic (e.g. 1,4)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="global batch size (all workers together)")
    parser.add_argument("--run-name", metavar="NAME",
                        help="Ray Train run name; re-submitting the same name resumes that run")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")


def train_flag_overrides(args: argparse.Namespace, role: str) -> list[str]:
    """``--set`` strings for the :func:`add_train_flags` flags that were given."""
    out = []
    if args.steps is not None:
        out.append(f"{role}.schedule.max_steps={args.steps}")
    if args.epochs is not None:
        out.append(f"{role}.schedule.epochs={args.epochs}")
    if args.workers:
        parts = [p.strip() for p in str(args.workers).split(",") if p.strip()]
        if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"--workers: expected MIN or MIN,MAX (integers), got {args.workers!r}")
        lo, hi = int(parts[0]), int(parts[-1])
        out.append(f"{role}.scaling.num_workers=[{lo}, {hi}]")
    if args.batch_size is not None:
        out.append(f"{role}.global_batch_size={args.batch_size}")
    if args.run_name:
        out.append(f"{role}.checkpoint.run_name={args.run_name}")
    if args.gpu:
        out.append(f"{role}.scaling.use_gpu=true")
    return out


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--student``/``--teacher TASK=PATH``/``--model [NAME=]PATH``: how every job that scores
    or probes models is told which ones (read by :func:`must_ray.evaluate.run.models_from_flags`)."""
    parser.add_argument("--student", metavar="PATH", help="the student's model file")
    parser.add_argument("--teacher", action="append", metavar="TASK=PATH", help="a teacher's model file (repeatable)")
    parser.add_argument("--model", action="append", metavar="[NAME=]PATH",
                        help="any other model file (repeatable; NAME defaults to its folder name)")


def parse_scale(text: str) -> float:
    """A positive number, also written as a fraction (``1/256``): argparse ``type=`` for scales."""
    try:
        if "/" in str(text):
            num, den = str(text).split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


# Flags of the jobs that name an output directly (not through the config).
OUTPUT_FLAGS = ("out", "image_dir")
# Flags of the jobs that name input tables directly (not through the config).
INPUT_FLAGS = ("data", "table")


def load_job_config(args: argparse.Namespace, extra_overrides: Sequence[str] = ()) -> Config:
    """The validated config of a job: file + ``--set`` + overrides implied by plain flags.

    In a job submitted with ``ray job submit --working-dir``, relative output locations are
    refused here, before any work: they would land in Ray's temporary copy of the working dir
    (:func:`must_ray.storage.check_job_output_paths`). Checked: ``--out``/``--image-dir``,
    ``label.output``, ``*.checkpoint.storage_path``, absolute ``paths.*`` and ``paths.root`` — the latter
    only when the job got no explicit ``--out``/``--output`` (then it writes there instead; the
    trainers' checkpoint storage defaults to under ``--out`` too).

    Every ``s3://`` location among those and the inputs (``--data``, ``--table``, ``label.input``,
    ``<role>.data``, ``evaluate.data``) is checked next: an endpoint that does not answer, a missing
    bucket or refused credentials fail here, in seconds (:mod:`must_ray.object_store`)."""
    cfg = load_config(args.config, list(args.overrides) + list(extra_overrides))
    locations = job_output_locations(cfg)
    if any(getattr(args, name, None) for name in ("out", "output")):
        locations = [(key, path) for key, path in locations if key != "paths.root"]
    flags = [(f"--{name.replace('_', '-')}", getattr(args, name)) for name in OUTPUT_FLAGS
             if isinstance(getattr(args, name, None), str)]
    check_job_output_paths(locations + flags)
    check_object_store_locations(locations + flags + job_input_locations(cfg, args))
    return cfg


def job_input_locations(cfg: Config, args: argparse.Namespace) -> list[tuple[str, Any]]:
    """``(key or flag, location or list of them)`` of every input a job may read by name."""
    flags = [(f"--{name}", getattr(args, name)) for name in INPUT_FLAGS if getattr(args, name, None)]
    keys = [("label.input", cfg.label.input), ("teacher.data", cfg.teacher.data),
            ("student.data", cfg.student.data), ("evaluate.data", cfg.evaluate.data)]
    return flags + [(key, value) for key, value in keys if value]


def check_tables_exist(flag: str, tables: Sequence[str], hint: str) -> None:
    """Raise ConfigError (before Ray starts) for the first local ``tables`` path that does not exist."""
    for table in tables:
        if "://" not in table and not os.path.exists(table):
            raise ConfigError(f"{flag}: table not found: {table} ({hint})")


_RAY_CONNECTED_HERE = False  # init_ray connected this process (so the job disconnects before its summary)


def init_ray(cfg: Config, verbose: bool = False) -> None:
    """Connect to Ray: the configured/ambient cluster (``ray job submit`` sets RAY_ADDRESS), or a
    local instance on a laptop. Ray's own log noise is off unless ``verbose``
    (:func:`must_ray.ray_logs.quiet_ray`); warnings and errors of every worker still reach the driver.
    Joining a running cluster, the job's workers get this driver's AWS variables (endpoint,
    credentials, region: :func:`must_ray.object_store.worker_env_vars`), so they open the same
    ``s3://`` locations the driver does; a local instance's workers inherit them anyway."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    runtime_env = dict(quiet_ray(verbose, local=not address) or {})
    show_ray_data_progress()
    if ray.is_initialized():
        return
    aws = worker_env_vars() if address else {}
    if aws:
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **aws}
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)
    global _RAY_CONNECTED_HERE
    _RAY_CONNECTED_HERE = True

    check_cluster_paths(cfg)


def emit_summary(summary: dict[str, Any]) -> None:
    """Print the job's one-line JSON summary as the last stdout line. Disconnects from Ray first:
    Ray prints what workers and raylets report (a task retried after a node loss ...) to the
    driver's stdout from its own threads, which could otherwise land after the summary. (A job
    run inside a process that was already connected, as the tests do, leaves that connection be.)"""
    global _RAY_CONNECTED_HERE
    if _RAY_CONNECTED_HERE:
        import ray

        ray.shutdown()
        _RAY_CONNECTED_HERE = False
    sys.stdout.flush()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)


def _cell(value: Any) -> Optional[str]:
    if isinstance(value, bool) or value is None:
        return None if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value) and len(value) <= 8:
        return ", ".join(_cell(v) or "" for v in value)
    return None


def headline_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of a job's closing table: every scalar (number, path, flag, short list) of its
    summary, the nested ones named ``outer.inner`` (one level deep)."""
    rows: list[tuple[str, str]] = []
    for key in sorted(summary):
        value = summary[key]
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", c) for k, v in sorted(value.items()) if (c := _cell(v)) is not None]
        elif (c := _cell(value)) is not None:
            rows.append((key, c))
    return rows


def print_table(rows: Sequence[tuple[str, str]], stream=None) -> None:
    """Print ``rows`` (name, value) as a two-column plain-text table."""
    if not rows:
        return
    width = min(40, max(len(name) for name, _ in rows))
    stream = stream or sys.stdout
    print("", file=stream)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}", file=stream)
    print("", file=stream, flush=True)


def run_job(main: Callable[[], dict[str, Any]],
            table: Callable[[dict[str, Any]], Sequence[tuple[str, str]]] = headline_rows,
            ray_data_progress: bool = True) -> None:
    """Run a job body: config errors become a clean one-line message and exit code 2; the body's
    returned dict ends the job as a short table (``table(summary)``: headline numbers, report
    paths) and then the JSON summary line. Progress lines are tagged with the job's name
    (``ray_data_progress=False``: the job draws its own)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.time()
    try:
        with progress_tag(Path(sys.argv[0]).stem or "job", ray_data=ray_data_progress):
            summary = main()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    summary.setdefault("wall_s", round(time.time() - start, 2))
    print_table(table(summary))
    emit_summary(summary)
