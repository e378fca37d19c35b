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
  all      all six at default sizes; --write docs/benchmarks.md regenerates the doc
Details, figures and what each measures: docs/benchmarks.md.

Examples:
  python jobs/benchmark.py label                # 2048 images
  python jobs/benchmark.py label --num 1024 --set label.actors=[2,2] --set label.num_cpus_per_actor=0.75
  python jobs/benchmark.py train --steps 60 --ray 1x2 --ray 2x1
  python jobs/benchmark.py scaling --num 4096 --decode-cpus 0.5
  python jobs/benchmark.py all --write docs/benchmarks.md
"""
import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from must_ray.cli import init_ray, job_parser, load_job_config, run_job
from must_ray.config import ConfigError

NAMES = ("label", "train", "loader", "flops", "memory", "scaling")
# `all --smoke`: every benchmark at a tiny size (a correctness run for CI, not a measurement)
SMOKE = {
    "label": ["--num", "16", "--threads", "1", "--repeats", "1"],
    "train": ["--warmup", "1", "--steps", "2", "--ray", "1x2", "--threads", "1"],
    "loader": ["--rows", "64", "--epochs", "1", "--warmup", "1", "--steps", "2", "--repeats", "1"],
    "flops": ["--matmul-size", "256", "--reps", "1", "--teacher-batch", "4", "--student-batch", "4", "--threads", "1"],
    "memory": ["--num", "8"],
    "scaling": ["--num", "16", "--repeats", "1", "--probe-seconds", "0.1"],
}


def _int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _ray_config(text: str) -> str:
    from benchmarks.train import parse_ray_config

    try:
        parse_ray_config(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _common() -> argparse.ArgumentParser:
    """--config/--set accepted after the subcommand too (without clobbering values given before it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help="YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   help="override one config key; repeatable")
    return p


def _workdir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", help="keep inputs and outputs here (default: a temp dir, removed)")


# ----------------------------------------------------------------------------- subcommands


def bench_label(args, cfg) -> dict:
    """``label``: the labelling benchmark (benchmarks.label) with the parsed flags."""
    from benchmarks.label import benchmark_label

    init_ray(cfg)
    return benchmark_label(cfg, num_images=args.num, workdir=args.workdir, threads=args.threads, repeats=args.repeats)


def bench_train(args, cfg) -> dict:
    """``train``: the training benchmark (benchmarks.train) with the parsed flags."""
    from benchmarks.train import benchmark_train

    init_ray(cfg)
    return benchmark_train(cfg, warmup_steps=args.warmup, steps=args.steps, rows=args.rows, ray_configs=args.ray,
                           threads=args.threads, repeats=args.repeats, plain_max_seconds=args.plain_max_seconds,
                           workdir=args.workdir)


def bench_loader(args, cfg) -> dict:
    """``loader``: the input-pipeline benchmark (benchmarks.loader) with the parsed flags."""
    from benchmarks.loader import benchmark_loader

    init_ray(cfg)
    return benchmark_loader(cfg, rows=args.rows, epochs=args.epochs, warmup_batches=args.warmup, steps=args.steps,
                            repeats=args.repeats, workdir=args.workdir)


def bench_flops(args, cfg) -> dict:
    """``flops``: the FLOP-utilisation benchmark (benchmarks.flops; no Ray needed) with the parsed flags."""
    from benchmarks.flops import DEFAULT_STUDENT_BATCHES, DEFAULT_TEACHER_BATCHES, benchmark_flops

    return benchmark_flops(cfg, matmul_size=args.matmul_size, reps=args.reps,
                           teacher_batches=args.teacher_batch or DEFAULT_TEACHER_BATCHES,
                           student_batches=args.student_batch or DEFAULT_STUDENT_BATCHES,
                           threads=args.threads, compile_=args.compile)


def bench_memory(args, cfg) -> dict:
    """``memory``: the actor-memory benchmark (benchmarks.memory) with the parsed flags."""
    from benchmarks.memory import benchmark_memory

    init_ray(cfg)
    return benchmark_memory(cfg, num=args.num, workdir=args.workdir)


def bench_scaling(args, cfg) -> dict:
    """``scaling``: the actor-scaling benchmark (benchmarks.scaling) with the parsed flags."""
    from benchmarks.scaling import benchmark_scaling

    init_ray(cfg)
    return benchmark_scaling(cfg, num=args.num, actors=args.actors or (1, 2), cpus_per_actor=args.cpus_per_actor,
                             decode_cpus=args.decode_cpus, repeats=args.repeats, probe_seconds=args.probe_seconds,
                             workdir=args.workdir)


def bench_all(args, cfg, parser) -> dict:
    """Every benchmark with its default flags (``--smoke``: tiny ones); ``--write`` the doc. A
    benchmark that fails is recorded as an error and the others still run."""
    from benchmarks import doc
    from benchmarks.common import machine_info

    init_ray(cfg)
    machine = machine_info()
    results = {}
    for name in args.only or NAMES:
        sub = parser.parse_args([name] + (SMOKE[name] if args.smoke else []))
        t0 = time.time()
        try:
            results[name] = sub.func(sub, cfg)
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


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The job's parser: one subcommand per benchmark, each with its size flags and defaults."""
    from benchmarks import flops, loader, memory, scaling, train

    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(NAMES + ("all",)) + "}")
    common = _common()

    p = sub.add_parser("label", parents=[common], help="labelling: Ray Data job vs plain PyTorch loop")
    p.add_argument("--num", type=_int(1), default=2048, help="images (world scenes written as PNG files; default 2048)")
    p.add_argument("--threads", type=_int(1), action="append",
                   help="torch threads of the plain loop, repeatable; the fastest is the baseline (default: 1 and #CPUs)")
    p.add_argument("--repeats", type=_int(1), default=2,
                   help="rounds, in ABBA order (plain, ray, ray, plain ...); medians are reported (default 2)")
    _workdir(p)
    p.set_defaults(func=bench_label)

    p = sub.add_parser("train", parents=[common], help="student training: Ray Train vs plain PyTorch loop, steps/s",
                       description="Steady-state student steps/s and images/s: Ray Train (must_ray.train.driver.train) "
                                   "vs a plain PyTorch loop running the trainer's own step on the same table. "
                                   "Model, batch and optimiser: the config's student section.")
    p.add_argument("--warmup", type=_int(1), default=train.DEFAULT_WARMUP,
                   help=f"untimed steps before timing (default {train.DEFAULT_WARMUP})")
    p.add_argument("--steps", type=_int(1), default=train.DEFAULT_STEPS,
                   help=f"timed steps (default {train.DEFAULT_STEPS})")
    p.add_argument("--rows", type=_int(1), help="rows of the world table (default: one global batch more than the run takes)")
    p.add_argument("--ray", type=_ray_config, action="append", metavar="WORKERSxCPUS",
                   help="a Ray Train configuration, repeatable, e.g. 1x2 (1 worker, 2 CPUs = 2 torch threads) or "
                        "2x1 (default: 1x<cores> and <cores>x1)")
    p.add_argument("--threads", type=_int(1), action="append",
                   help="torch threads of the plain loop, repeatable; the fastest is the baseline (default: 1 and #CPUs)")
    p.add_argument("--repeats", type=_int(1), default=1,
                   help="Ray rounds, each bracketed by plain runs (plain, ray, plain ...); medians (default 1)")
    p.add_argument("--plain-max-seconds", type=_positive_float, default=train.DEFAULT_PLAIN_MAX_S,
                   help="cap on each plain run's timed steps (warm-up: a third of it); its rate is over the steps "
                        f"done (default {train.DEFAULT_PLAIN_MAX_S:g})")
    _workdir(p)
    p.set_defaults(func=bench_train)

    p = sub.add_parser("loader", parents=[common], help="training input pipeline alone vs training consumption, images/s",
                       description="The trainer's input path (read_tables -> cache -> streaming_split -> "
                                   "iter_torch_batches with TrainCollate) consumed without a model, vs the images/s "
                                   "of the trainer's step on already collated batches.")
    p.add_argument("--rows", type=_int(1), default=loader.DEFAULT_ROWS,
                   help=f"rows of the world table (default {loader.DEFAULT_ROWS})")
    p.add_argument("--epochs", type=_int(1), default=loader.DEFAULT_EPOCHS,
                   help=f"epochs the loader runs (default {loader.DEFAULT_EPOCHS})")
    p.add_argument("--warmup", type=_int(1), default=loader.DEFAULT_WARMUP,
                   help=f"untimed batches at the start (default {loader.DEFAULT_WARMUP})")
    p.add_argument("--steps", type=_int(1), default=20, help="timed training steps of the consumption side (default 20)")
    p.add_argument("--repeats", type=_int(1), default=2, help="rounds, alternating the order; medians (default 2)")
    _workdir(p)
    p.set_defaults(func=bench_loader)

    p = sub.add_parser("flops", parents=[common], help="matmul peak vs teacher inference / student step FLOP rate",
                       description="Measured fp32 matmul peak vs the FLOP rate (FlopCounterMode counts) of teacher "
                                   "inference and student training steps, with variants (batch, channels_last, "
                                   "threads, torch.compile). Runs in this process, without Ray.")
    p.add_argument("--matmul-size", type=_int(16), default=flops.DEFAULT_MATMUL,
                   help=f"side of the square matrices of the peak measurement (default {flops.DEFAULT_MATMUL})")
    p.add_argument("--reps", type=_int(1), default=flops.DEFAULT_REPS,
                   help=f"timed calls per variant, median (default {flops.DEFAULT_REPS})")
    p.add_argument("--teacher-batch", type=_int(1), action="append",
                   help="extra teacher batch sizes to try, repeatable (default 16 and 256; label.batch_size always)")
    p.add_argument("--student-batch", type=_int(1), action="append",
                   help="extra student batch sizes to try, repeatable (default 64; student.global_batch_size always)")
    p.add_argument("--threads", type=_int(1), action="append", help="thread counts, repeatable (default 1 and #CPUs)")
    p.add_argument("--compile", action="store_true",
                   help="add a torch.compile variant of the teachers' forward (compiling takes minutes on 2 cores)")
    p.set_defaults(func=bench_flops)

    p = sub.add_parser("memory", parents=[common], help="teacher actor peak RSS for N and 4N images",
                       description="Labels N then 4N images with the real labelling job; each teacher actor reports "
                                   "its peak RSS (getrusage high-water mark) with every shard.")
    p.add_argument("--num", type=_int(1), default=memory.DEFAULT_NUM, help=f"N (default {memory.DEFAULT_NUM})")
    _workdir(p)
    p.set_defaults(func=bench_memory)

    p = sub.add_parser("scaling", parents=[common], help="labelling throughput, 1 vs 2 teacher actors",
                       description="The labelling job on the same images with each actor-pool size (same per-actor "
                                   "CPUs, 1 torch thread per actor, label PNGs encoded in that thread); steady "
                                   "images/s and the speedup.")
    p.add_argument("--num", type=_int(1), default=scaling.DEFAULT_NUM, help=f"images (default {scaling.DEFAULT_NUM})")
    p.add_argument("--actors", type=_int(1), action="append", help="pool sizes, repeatable (default 1 and 2)")
    p.add_argument("--cpus-per-actor", type=_positive_float,
                   help="logical CPUs per actor (default min(1, (CPUs - decode CPUs) / largest pool))")
    p.add_argument("--decode-cpus", type=_positive_float, default=scaling.DEFAULT_DECODE_CPUS,
                   help=f"logical CPUs per decode task (default {scaling.DEFAULT_DECODE_CPUS})")
    p.add_argument("--repeats", type=_int(1), default=2, help="rounds, alternating the order (1, 2, 2, 1); medians (default 2)")
    p.add_argument("--probe-seconds", type=_positive_float, default=2.0,
                   help="length of each machine-capacity probe (concurrent matmul workers vs one; default 2)")
    _workdir(p)
    p.set_defaults(func=bench_scaling)

    p = sub.add_parser("all", parents=[common], help="all benchmarks at default sizes; --write the docs page")
    p.add_argument("--write", metavar="PATH", help="regenerate the generated block of this Markdown file "
                                                  "(e.g. docs/benchmarks.md); the text around it is kept")
    p.add_argument("--only", choices=NAMES, action="append", help="run only these benchmarks (repeatable)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs, measures nothing")
    p.set_defaults(func=lambda a, c: bench_all(a, c, parser))
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = load_job_config(args)
    return args.func(args, cfg)


if __name__ == "__main__":
    run_job(main)
