"""What every job in ``jobs/`` shares: ``--config``/``--set`` parsing, Ray start-up, the JSON
summary line. Jobs stay thin: parse, call the library, print the summary."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from must_ray.config import Config, load_config
from must_ray.storage import check_cluster_paths, check_job_output_paths, job_output_locations
from must_ray.typed_config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo.yaml"

log = logging.getLogger("must_ray")


def job_parser(description: str, epilog: str = "") -> argparse.ArgumentParser:
    """An argument parser with the options every job has (``--config``, ``--set``)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=(epilog + "\n\n" if epilog else "")
        + "Any config key can be overridden with --set dotted.key=value (repeatable), e.g.\n"
        "  --set paths.root=/data/run1 --set world.image_size=96\n"
        "The job's last stdout line is a JSON summary of what it wrote and its headline metrics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="PATH",
                        help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (dotted path; value parsed as YAML); repeatable")
    return parser


# Flags of the jobs that name an output directly (not through the config).
OUTPUT_FLAGS = ("out", "image_dir")


def load_job_config(args: argparse.Namespace, extra_overrides: Sequence[str] = ()) -> Config:
    """The validated config of a job: file + ``--set`` + overrides implied by plain flags.

    In a job submitted with ``ray job submit --working-dir``, relative output locations are
    refused here, before any work: they would land in Ray's temporary copy of the working dir
    (:func:`must_ray.storage.check_job_output_paths`). Checked: ``--out``/``--image-dir``,
    ``label.output``, ``*.checkpoint.storage_path``, absolute ``paths.*`` and ``paths.root`` — the latter
    only when the job got no explicit ``--out``/``--output`` (then it writes there instead; the
    trainer checks its default checkpoint storage under ``paths.root`` itself)."""
    cfg = load_config(args.config, list(args.overrides) + list(extra_overrides))
    locations = job_output_locations(cfg)
    if any(getattr(args, name, None) for name in ("out", "output")):
        locations = [(key, path) for key, path in locations if key != "paths.root"]
    flags = [(f"--{name.replace('_', '-')}", getattr(args, name)) for name in OUTPUT_FLAGS
             if isinstance(getattr(args, name, None), str)]
    check_job_output_paths(locations + flags)
    return cfg


def init_ray(cfg: Config) -> None:
    """Connect to Ray: the configured/ambient cluster (``ray job submit`` sets RAY_ADDRESS), or a
    local instance on a laptop."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)

    check_cluster_paths(cfg)


def emit_summary(summary: dict[str, Any]) -> None:
    """Print the job's one-line JSON summary as the last stdout line."""
    sys.stdout.flush()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)


def run_job(main: Callable[[], dict[str, Any]]) -> None:
    """Run a job body: config errors become a clean one-line message and exit code 2; the body's
    returned dict is printed as the summary line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.time()
    try:
        summary = main()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    summary.setdefault("wall_s", round(time.time() - start, 2))
    emit_summary(summary)
