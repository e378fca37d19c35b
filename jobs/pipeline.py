"""Run the whole MuST pipeline: world -> teachers -> pseudo labels -> student -> evaluation -> transfer.

Examples:
  python jobs/pipeline.py                                          # the demo (jobs/configs/demo.yaml) into out/demo
  python jobs/pipeline.py --config jobs/configs/must-synthetic.yaml --out /data/must
  python jobs/pipeline.py --only evaluate --only transfer          # just those steps

Steps whose outputs exist (and whose inputs did not change) are skipped, so rerunning a crashed
pipeline resumes it; deleting a step's output redoes that step and the steps that read it.
"""


from must_ray.cli import init_ray, job_parser, load_job_config, run_job


def main() -> dict:
    parser = job_parser(__doc__.splitlines()[0], "\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", metavar="DIR", help="root of every output (sets paths.root)")
    parser.add_argument("--only", action="append", metavar="STEP",
                        help="run only this step (repeatable): world, teachers, label, student, evaluate, transfer")
    args = parser.parse_args()
    cfg = load_job_config(args, [f"paths.root={args.out}"] if args.out else [])

    from must_ray.pipeline import run_pipeline

    init_ray(cfg)
    result = run_pipeline(cfg, only=args.only)
    evaluation = result["steps"].get("evaluate") or {}
    transfer = result["steps"].get("transfer") or {}
    return {
        "job": "pipeline", "config": args.config, "root": cfg.paths.root, "ran": result["ran"],
        "skipped": result["skipped"], "metrics_json": evaluation.get("metrics_json"),
        "grid_png": evaluation.get("grid_png"), "curves_png": evaluation.get("curves_png"),
        "student_vs_teachers": evaluation.get("comparison"), "must_passed": evaluation.get("passed"),
        "beats_trivial": (evaluation.get("beats_trivial") or {}).get("student"),
        "transfer": {row.get("backbone"): row.get("values") for row in (transfer.get("table") or [])},
    }


if __name__ == "__main__":
    run_job(main)
