"""Benchmarks, reported as ratios against plain PyTorch; one JSON line per run.

Subcommands:
  label   the Ray Data labelling job vs a plain single-process PyTorch loop on the same images,
          teachers and cores (target: ratio >= 0.9)

Examples:
  python jobs/benchmark.py label                # 2048 images
  python jobs/benchmark.py label --num 1024 --set label.actors=[2,2] --set label.num_cpus_per_actor=0.75
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from must_ray.cli import init_ray, job_parser, load_job_config, run_job  # noqa: E402


def _common() -> argparse.ArgumentParser:
    """--config/--set accepted after the subcommand too (without clobbering values given before it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help="YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   help="override one config key; repeatable")
    return p


def bench_label(args, cfg) -> dict:
    from must_ray.benchmarks.label import benchmark_label

    init_ray(cfg)
    return benchmark_label(cfg, num_images=args.num, workdir=args.workdir, threads=args.threads, repeats=args.repeats)


def main() -> dict:
    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{label}")
    p = sub.add_parser("label", parents=[_common()], help="labelling: Ray Data job vs plain PyTorch loop")
    p.add_argument("--num", type=int, default=2048, help="images (world scenes written as PNG files; default 2048)")
    p.add_argument("--threads", type=int, action="append",
                   help="torch threads of the plain loop, repeatable; the fastest is the baseline (default: 1 and #CPUs)")
    p.add_argument("--workdir", help="keep images and outputs here (default: a temp dir, removed)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds, in ABBA order (plain, ray, ray, plain ...); medians are reported (default 2)")
    p.set_defaults(func=bench_label)
    args = parser.parse_args()
    cfg = load_job_config(args)
    return args.func(args, cfg)


if __name__ == "__main__":
    run_job(main)
