"""Score trained models on a labelled examples table (Ray Data) and compare the student with its teachers.

Examples:
  python jobs/evaluate.py                                      # the run's student + teachers on <paths.root>/world/test
  python jobs/evaluate.py --student out/demo/student/model.pt --teacher depth=out/demo/teachers/depth/model.pt
  python jobs/evaluate.py --model out/x/model.pt --model other=/tmp/m.pt --data /data/test_table --out /tmp/eval
  python jobs/evaluate.py --no-ray --no-pictures               # small tables: score in this process

Every model is scored with the metric of each task it has a head for and the table has labels for,
next to the task's trivial baseline (majority class, mean depth, no boxes ...). With a student and
teachers, each teacher's task is compared: the student passes when its primary metric is >= 0.98x the
teacher's (higher is better) or <= 1.02x (lower is better; evaluate.tolerance). Writes metrics.json
(strict JSON), metrics.md, grid.png and curves.png into --out (default <paths.root>/<paths.reports>).
"""
import os

from must_ray.cli import add_model_flags, check_tables_exist, init_ray, job_parser, load_job_config, run_job


def main() -> dict:
    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    add_model_flags(parser)
    parser.add_argument("--data", action="append", metavar="TABLE",
                        help="labelled examples table (repeatable; default evaluate.data or "
                             "<paths.root>/<paths.world>/test)")
    parser.add_argument("--out", metavar="DIR", help="report directory (default <paths.root>/<paths.reports>)")
    parser.add_argument("--no-ray", action="store_true", help="score in this process instead of a Ray Data actor pool")
    parser.add_argument("--no-pictures", action="store_true", help="skip grid.png and curves.png")
    args = parser.parse_args()
    cfg = load_job_config(args, ["evaluate.use_ray=false"] if args.no_ray else [])

    from must_ray.evaluate.run import models_from_flags, run_evaluation

    student, teachers, models = models_from_flags(cfg, args)
    data = args.data or cfg.evaluate.data or [os.path.join(cfg.paths.resolve("world"), "test")]
    check_tables_exist("--data", data, "render it with jobs/make_world.py --split test")
    if cfg.evaluate.use_ray:
        init_ray(cfg, verbose=args.verbose)
    return run_evaluation(cfg, student=student, teachers=teachers, models=models, data=data, out_dir=args.out,
                          pictures=not args.no_pictures, discover=False)


if __name__ == "__main__":
    run_job(main)
