"""Run one experiment: a base pipeline config, arms that each change a few keys, one results table.

Examples:
  python jobs/experiment.py jobs/configs/experiments/partial-labels.yaml
  python jobs/experiment.py jobs/configs/experiments/pool-size.yaml --arm pool_2k   # one arm
  python jobs/experiment.py EXP.yaml --set student.schedule.max_steps=50            # every arm, smaller

The experiment file names its base config, the keys every arm shares and the arms
(docs/results.md). The seed run under seed_root renders the world, trains the teachers and
pseudo-labels the pool once; each arm is a pipeline run of its own under <root>/<arm> that starts
from a copy of the seed, so it redoes only what its keys change. Rerunning resumes: finished arms
are skipped, a crashed one resumes where it stopped. Results: <root>/results/<name>.{json,md}
(and .png when the file names an x key).
"""
from typing import Any

from must_ray.cli import init_ray, job_parser, run_job


def main() -> dict:
    parser = job_parser(__doc__.splitlines()[0], "\n".join(__doc__.splitlines()[2:]), config_flag=False)
    parser.add_argument("experiment", metavar="EXPERIMENT.yaml", help="the experiment file")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME",
                        help="run only this arm (repeatable); the results table holds every finished arm")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the results of the arms already finished (no Ray)")
    args = parser.parse_args()

    from must_ray.experiment import arm_config, load_experiment, report_experiment, run_experiment, seed_config

    spec, base = load_experiment(args.experiment)
    seed = seed_config(spec, base, args.overrides)
    for arm in args.arm or spec.arms:  # an unknown arm or a bad key fails before Ray starts
        arm_config(spec, base, arm, args.overrides)
    if args.report_only:
        results, files = report_experiment(spec, base, args.overrides)
        return {"job": "experiment", "experiment": spec.name, "seed": {"root": seed.paths.root, "ran": []},
                "arms": {}, "results": results, "files": files}
    init_ray(seed, verbose=args.verbose)
    result = run_experiment(spec, base, args.arm, args.overrides)
    return {"job": "experiment", "experiment": spec.name, **result}


def headline(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The closing table: each arm's student / teacher ratio per task, then the result files."""
    rows = [("seed", f"{summary['seed']['root']} (ran: {', '.join(summary['seed']['ran']) or 'nothing'})")]
    for arm, r in summary["results"].items():
        ratios = "  ".join(f"{t} {v['ratio']:.3f}" for t, v in r["tasks"].items() if isinstance(v.get("ratio"), float))
        rows.append((f"{arm}: student / teacher", ratios))
    rows += [(key.replace("_", "."), path) for key, path in summary["files"].items()]
    rows.append(("wall", f"{summary.get('wall_s', 0):.0f} s"))
    return rows


if __name__ == "__main__":
    run_job(main, table=headline)
