"""Transfer evaluation: frozen backbones (student, teachers, random init) + light probes on a shifted domain.

Examples:
  python jobs/transfer.py                               # the run's student + teachers, transfer.domain of the world
  python jobs/transfer.py --student s.pt --teacher depth=t.pt --set transfer.domain=dim
  python jobs/transfer.py --model a=/m/a.pt --train /data/train_table --test /data/test_table

Each backbone is frozen; its features are extracted once for the transfer train and test splits
(by default rendered from the world in transfer.domain, which no model trained on), ridge probes
(linear on pooled features for classification, per-pixel 1x1 for dense tasks) are fitted on the
train split and scored on the test split. Writes transfer.json (strict JSON) and transfer.md into
--out (default <paths.root>/<paths.reports>).
"""


from must_ray.cli import add_model_flags, init_ray, job_parser, load_job_config, run_job
from must_ray.typed_config import ConfigError


def main() -> dict:
    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    add_model_flags(parser)
    parser.add_argument("--train", metavar="TABLE",
                        help="probe-fitting table (default: transfer.train_data or the world split)")
    parser.add_argument("--test", metavar="TABLE",
                        help="scoring table (default: transfer.test_data or the world split)")
    parser.add_argument("--out", metavar="DIR", help="report directory (default <paths.root>/<paths.reports>)")
    args = parser.parse_args()
    if (args.train is None) != (args.test is None):
        raise ConfigError("--train and --test go together")
    cfg = load_job_config(args)

    from must_ray.evaluate.run import models_from_flags, teacher_name
    from must_ray.evaluate.transfer import run_transfer, write_transfer

    student, teachers, models = models_from_flags(cfg, args)
    backbones = {"student": student} if student else {}
    backbones.update({teacher_name(t): p for t, p in teachers.items()})
    backbones.update(models)
    init_ray(cfg, verbose=args.verbose)  # the world's transfer splits are rendered with Ray Data
    result = run_transfer(cfg, backbones, args.train, args.test)
    files = write_transfer(args.out or cfg.paths.resolve("reports"), result)
    from must_ray.io import strict_json

    return {"job": "transfer", **files, "tasks": result["tasks"], "best": result["best"],
            "table": {r["backbone"]: strict_json(r["values"]) for r in result["rows"]}}


if __name__ == "__main__":
    run_job(main)
