"""Train one specialised teacher (one task, its labelled table) with Ray Train.

Examples:
  python jobs/train_teacher.py --task depth           # <paths.root>/world/teacher_depth -> <paths.root>/teachers/depth/
  python jobs/train_teacher.py --task detection --data tables/coco_det --steps 2000 --workers 1,4
  ray job submit --working-dir . -- python jobs/train_teacher.py --task segmentation --run-name seg-v1
Re-submitting with the same --run-name (and storage) resumes that run from its last checkpoint.
"""
import sys
from pathlib import Path

from must_ray.cli import (
    add_train_flags,
    check_tables_exist,
    init_ray,
    job_parser,
    load_job_config,
    run_job,
    train_flag_overrides,
)
from must_ray.task_registry import CANONICAL_ORDER, registered_task_names
from must_ray.typed_config import ConfigError


def main() -> dict:
    parser = job_parser(__doc__.splitlines()[0], "\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--task", required=True,
                        help=f"the teacher's task: {', '.join(CANONICAL_ORDER)}, or one of the config's "
                             "task_modules")
    add_train_flags(parser)
    args = parser.parse_args()
    flags = train_flag_overrides(args, "teacher")
    cfg = load_job_config(args, flags)  # imports the config's task_modules
    if args.task not in registered_task_names():
        raise ConfigError(f"--task {args.task}: unknown task; known: {', '.join(registered_task_names())}")
    if flags and args.task in cfg.teacher.per_task:  # a flag also wins over the task's own recipe
        cfg = load_job_config(args, flags + [f"teacher.per_task.{args.task}." + f.split(".", 1)[1] for f in flags])
    data = args.data or cfg.teacher.data or [str(Path(cfg.paths.resolve("world")) / f"teacher_{args.task}")]
    out = args.out or str(Path(cfg.paths.resolve("teachers")) / args.task)
    check_tables_exist("--data", data, "render it with jobs/make_world.py, or give --data")
    from must_ray.train.driver import train

    init_ray(cfg, verbose=args.verbose)
    summary = train(cfg, "teacher", data=data, tasks=[args.task], out_dir=out)
    print(f"teacher {args.task}: {summary['steps']} steps, final losses {summary['final_losses']} "
          f"-> {summary['model']}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    run_job(main)
