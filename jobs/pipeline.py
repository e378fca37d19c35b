"""Run the whole MuST pipeline: world -> teachers -> pseudo labels -> student -> evaluation -> transfer.

Examples:
  python jobs/pipeline.py                                          # the demo (jobs/configs/demo.yaml) into out/demo
  python jobs/pipeline.py --config jobs/configs/must-synthetic.yaml --out /data/must
  python jobs/pipeline.py --only evaluate --only transfer          # just those steps
  python jobs/pipeline.py --set tasks.detection.score_threshold=0.5 # relabel + student + reports; teachers kept
  python jobs/pipeline.py --force student                          # retrain the student, redo what reads it
  python jobs/pipeline.py --rounds 2                               # + relabel with the student, train a new one

A step is skipped only when it finished under the same config values it reads and the same
inputs (its identity, docs/pipeline.md); every skip and every rerun prints why. So rerunning a
crashed pipeline resumes it, a changed key reruns exactly the steps that read it and the steps
downstream, and deleting a step's output redoes that step and the steps that read it.
"""
from typing import Any

from must_ray.cli import init_ray, job_parser, load_job_config, run_job

STEPS = "world, teachers, label, student, [label_r2, student_r2, ... with --rounds], evaluate, transfer"


def main() -> dict:
    parser = job_parser(__doc__.splitlines()[0], "\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", metavar="DIR", help="root of every output (sets paths.root)")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="self-training rounds (sets rounds): round r > 1 relabels the pool with the round r-1 "
                             "student and trains a fresh student on those labels (steps label_r<r>, student_r<r>)")
    parser.add_argument("--only", action="append", metavar="STEP",
                        help=f"run only this step (repeatable): {STEPS}")
    parser.add_argument("--force", action="append", default=[], metavar="STEP",
                        help="rerun this step even when it is up to date, and every step after it that reads it "
                             "(repeatable)")
    args = parser.parse_args()
    cfg = load_job_config(args, ([f"paths.root={args.out}"] if args.out else [])
                          + ([f"rounds={args.rounds}"] if args.rounds is not None else []))

    from must_ray.pipeline import plan_request, run_pipeline

    plan_request(cfg, only=args.only, force=args.force)  # unknown or out-of-date steps: exit 2 before Ray starts
    init_ray(cfg, verbose=args.verbose)
    result = run_pipeline(cfg, only=args.only, force=args.force)
    evaluation = result["steps"].get("evaluate") or {}
    transfer = result["steps"].get("transfer") or {}
    return {
        "job": "pipeline", "config": args.config, "root": cfg.paths.root, "ran": result["ran"],
        "skipped": result["skipped"], "reasons": result["reasons"], "metrics_json": evaluation.get("metrics_json"),
        "metrics_md": evaluation.get("metrics_md"), "transfer_files": transfer.get("files"),
        "grid_png": evaluation.get("grid_png"), "curves_png": evaluation.get("curves_png"),
        "student_vs_teachers": evaluation.get("comparison"), "must_passed": evaluation.get("passed"),
        "beats_trivial": (evaluation.get("beats_trivial") or {}).get("student"),
        "transfer": {row.get("backbone"): row.get("values") for row in (transfer.get("table") or [])},
    }


def headline(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The closing table: what ran, the student vs each teacher, transfer, the report files."""
    rows = [("ran", ", ".join(summary["ran"]) or "-"), ("skipped (up to date)", ", ".join(summary["skipped"]) or "-")]
    for task, r in sorted((summary.get("student_vs_teachers") or {}).items()):
        ratio = f"{r['ratio']:.3f}" if isinstance(r.get("ratio"), (int, float)) else "-"
        rows.append((f"{task}: student / teacher", f"{_num(r.get('student'))} / {_num(r.get('teacher'))}  "
                                                   f"ratio {ratio}  {'pass' if r.get('pass') else 'FAIL'}"))
    if summary.get("must_passed") is not None:
        rows.append(("MuST criterion met", "yes" if summary["must_passed"] else "no"))
    for backbone, values in sorted((summary.get("transfer") or {}).items()):
        if isinstance(values, dict):
            rows.append((f"transfer {backbone}", "  ".join(f"{k} {_num(v)}" for k, v in sorted(values.items()))))
    files = {k: summary.get(k) for k in ("metrics_md", "metrics_json", "grid_png", "curves_png")}
    files.update(summary.get("transfer_files") or {})
    rows += [(key.replace("_", "."), str(path)) for key, path in files.items() if path]
    rows.append(("wall", f"{summary.get('wall_s', 0):.0f} s"))
    return rows


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


if __name__ == "__main__":
    run_job(main, table=headline)
