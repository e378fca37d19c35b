"""Benchmarks, reported against plain PyTorch and the design's targets; one JSON line per run.

Subcommands (each warms up before timing; default sizes take under 3 minutes on 2 cores):
  label    the Ray Data labelling job vs a plain single-process PyTorch loop on the same images,
           teachers and cores (target: ratio >= 0.9)
  train    Ray Train student steps/s (1 worker x all cores, 1 worker per core) vs a plain PyTorch
           loop on the same table, model and step (target: ratio >= 0.9 each)
  loader   the training input pipeline alone (Parquet -> decode -> augment -> batches) vs the
           images/s a training step consumes (target: >= 3x)
  flops    measured fp32 matmul peak vs the FLOP rate of teacher inference and student training
           steps, and what batch size / channels_last / threads / torch.compile change (reported)
  memory   peak RSS of a teacher actor labelling N and 4N images (target: growth < 10 %)
  scaling  labelling throughput with 1 vs 2 teacher actors (target: >= 1.8x)
  scale    the labelling driver at 1M/4M/16M ids: plan + describe + verify seconds and driver peak RSS
           (target: RSS growth < 200 MiB, planning 16M < 2 min); s/image at 2k/8k/32k images (flat)
  all      all seven at default sizes; --write docs/benchmarks.md regenerates the doc
Details, figures and what each measures: docs/benchmarks.md.

Examples:
  python jobs/benchmark.py label                # 2048 images
  python jobs/benchmark.py label --num 1024 --set label.actors=[2,2] --set label.num_cpus_per_actor=0.75
  python jobs/benchmark.py train --steps 60 --ray 1x2 --ray 2x1
  python jobs/benchmark.py scaling --num 4096 --decode-cpus 0.5
  python jobs/benchmark.py all --write docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Optional, Sequence

from benchmarks import doc, flops, label, loader, memory, precision, scale, scaling, train
from benchmarks.common import machine_info
from benchmarks.options import Benchmark, add_options, options_from
from must_ray.cli import init_ray, job_parser, load_job_config
from must_ray.config import Config
from must_ray.typed_config import ConfigError

#: every benchmark, in the order ``all`` runs them
BENCHMARKS: dict[str, Benchmark] = {m.BENCHMARK.name: m.BENCHMARK for m in (label, train, loader, flops, precision,
                                                                           memory, scaling, scale)}
NAMES = tuple(BENCHMARKS)


def _common() -> argparse.ArgumentParser:
    """--config/--set accepted after the subcommand too (without clobbering values given before it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help="YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   help="override one config key; repeatable")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The job's parser: one subcommand per benchmark (its flags from its options class), and ``all``."""
    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(NAMES + ("all",)) + "}")
    common = _common()
    for bench in BENCHMARKS.values():
        p = sub.add_parser(bench.name, parents=[common], help=bench.help, description=bench.description)
        add_options(p, bench.options)
    p = sub.add_parser("all", parents=[common], help="all benchmarks at default sizes; --write the docs page")
    p.add_argument("--write", metavar="PATH", help="regenerate the generated block of this Markdown file "
                                                  "(e.g. docs/benchmarks.md); the text around it is kept")
    p.add_argument("--only", choices=NAMES, action="append", help="run only these benchmarks (repeatable)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs, measures nothing")
    return parser


def run_benchmark(bench: Benchmark, options: Any, cfg: Config) -> dict[str, Any]:
    """One benchmark with its options (on the config's Ray when it needs one)."""
    if bench.needs_ray:
        init_ray(cfg)
    return bench.run(cfg, options)


def run_all(args: argparse.Namespace, cfg: Config, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Every benchmark with its default flags (``--smoke``: tiny ones); ``--write`` the doc. A
    benchmark that fails is recorded as an error and the others still run."""
    init_ray(cfg)
    machine = machine_info()
    results = {}
    for name in args.only or NAMES:
        bench = BENCHMARKS[name]
        sub = parser.parse_args([name, *(bench.smoke if args.smoke else ())])
        t0 = time.time()
        try:
            results[name] = run_benchmark(bench, options_from(sub, bench.options), cfg)
            results[name]["wall_s"] = round(time.time() - t0, 1)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed benchmark must not lose the others' figures
            logging.getLogger("must_ray").exception("benchmark %s failed", name)
            results[name] = {"benchmark": name, "error": f"{type(exc).__name__}: {exc}"}
    if args.write:
        doc.write(args.write, doc.render(results, machine))
    checks = [dict(c, benchmark=n) for n, r in results.items() for c in r.get("checks", [])]
    return {"benchmark": "all", "machine": machine, "written": args.write, "results": results,
            "missed": [f"{c['benchmark']}: {c['name']}" for c in checks if c["met"] is False],
            "errors": [n for n, r in results.items() if "error" in r]}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse ``argv`` (default the command line), load the config, run the chosen benchmark(s)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = load_job_config(args)
    if args.benchmark == "all":
        return run_all(args, cfg, parser)
    bench = BENCHMARKS[args.benchmark]
    return run_benchmark(bench, options_from(args, bench.options), cfg)


__all__ = ["BENCHMARKS", "NAMES", "build_parser", "main", "run_all", "run_benchmark"]
