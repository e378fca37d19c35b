"""Pseudo-label images with every teacher (Ray Data), written as one examples table, exactly once.

Examples:
  python jobs/label.py --set label.teachers.classification.kind=random ...   # dry run, random teachers
  python jobs/label.py --input /data/pool --output /data/labels            # a folder of images (recursive)
  python jobs/label.py --input 's3://bucket/pool/*.jpg' --output s3://bucket/labels
  python jobs/label.py --input /data/table.parquet                          # a table with an image column
  python jobs/label.py --input world:unlabeled                              # render the synthetic split on the fly

Without --input it labels <paths.root>/<paths.world>/unlabeled (rendered on the fly when that table
does not exist). Teachers default to the trained checkpoints <paths.root>/<paths.teachers>/<task>/model.pt;
change one with --set label.teachers.<task>.kind=random|checkpoint|timm|... (docs/labeling.md).
Rerunning the same command resumes: committed shards are kept, the rest is labelled. Bad images go
to <output>_quarantine with a reason.
"""
import json

from must_ray.cli import init_ray, job_parser, load_job_config, run_job


def main() -> dict:
    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    parser.add_argument("--input", metavar="PATH_OR_URI",
                        help="images folder / glob / file, a Parquet table, or world:<split> (default: label.input)")
    parser.add_argument("--output", metavar="DIR",
                        help="output table directory or URI (default: label.output, else <paths.root>/<paths.labels>)")
    args = parser.parse_args()
    extra = []
    if args.input is not None:
        extra.append(f"label.input={_yaml_str(args.input)}")
    if args.output is not None:
        extra.append(f"label.output={_yaml_str(args.output)}")
    cfg = load_job_config(args, extra)

    from must_ray.label.run import LabelRun, run_labeling

    run = LabelRun(cfg)  # fail fast (missing teacher, bad input or output) before starting Ray
    run.check_input()  # and a table input's schema and ids
    init_ray(cfg, verbose=args.verbose)
    return run_labeling(cfg, run=run)  # plans (Ray tasks write the pieces) or resumes the plan, then labels


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML string: paths with ':' or '*' stay strings


if __name__ == "__main__":
    run_job(main, ray_data_progress=False)  # the labeller draws its own progress line
