"""Train the multi-task student on pseudo-label tables (plus optional real-label tables) with Ray Train.

Examples:
  python jobs/train_student.py                                     # <paths.root>/labels -> <paths.root>/student/
  python jobs/train_student.py --data out/demo/labels --data tables/coco_det --steps 3000 --workers 2,8
  ray job submit --working-dir . -- python jobs/train_student.py --run-name student-v1 --gpu --workers 4
Every task with a column in any table is trained (restrict with --set student.tasks=[depth,normals]);
a row without a task's label masks that task's loss for the row. Re-submitting with the same
--run-name (and storage) resumes that run from its last checkpoint.
"""
import sys

from must_ray.cli import (
    add_train_flags,
    check_tables_exist,
    init_ray,
    job_parser,
    load_job_config,
    run_job,
    train_flag_overrides,
)


def main() -> dict:
    parser = job_parser(__doc__.splitlines()[0], "\n".join(__doc__.splitlines()[2:]))
    add_train_flags(parser)
    args = parser.parse_args()
    cfg = load_job_config(args, train_flag_overrides(args, "student"))
    data = args.data or cfg.student.data or [cfg.paths.resolve("labels")]
    out = args.out or cfg.paths.resolve("student")
    check_tables_exist("--data", data, "label the pool first: jobs/label.py, or give --data")
    from must_ray.train.driver import train

    init_ray(cfg, verbose=args.verbose)
    summary = train(cfg, "student", data=data, out_dir=out)
    print(f"student {summary['tasks']}: {summary['steps']} steps, final losses {summary['final_losses']} "
          f"-> {summary['model']}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    run_job(main)
