"""Render splits of the embedded synthetic world as examples tables (Parquet), with Ray Data.

Examples:
  python jobs/make_world.py                                  # every split of the config, under paths.root/world/
  python jobs/make_world.py --split test --num 64 --out /tmp/test_table
  python jobs/make_world.py --split unlabeled --image-dir /tmp/pool_png   # also plain PNG files
"""
import sys
from pathlib import Path

from must_ray.cli import init_ray, job_parser, load_job_config, run_job
from must_ray.io import is_uri
from must_ray.label.paths import check_output_dir
from must_ray.typed_config import ConfigError


def main() -> dict:
    parser = job_parser(__doc__.splitlines()[0], "\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--split", action="append", metavar="NAME",
                        help="split to write (repeatable; default: every split in world.splits)")
    parser.add_argument("--num", type=int, help="number of scenes (overrides world.splits.NAME.num)")
    parser.add_argument("--out", metavar="DIR",
                        help="output table directory (with one --split) or parent directory (several); "
                             "default: <paths.root>/<paths.world>/<split>")
    parser.add_argument("--image-dir", metavar="DIR", help="also write each image as a PNG file here")
    args = parser.parse_args()
    cfg = load_job_config(args)

    from must_ray.world.splits import check_split_output, write_split

    names = args.split or sorted(cfg.world.splits)
    for n in names:
        if n not in cfg.world.splits:
            raise ConfigError(f"--split {n}: unknown split; known: {', '.join(sorted(cfg.world.splits))}")
    outs = {name: args.out if args.out and len(names) == 1 else str(Path(args.out or cfg.paths.resolve("world")) / name)
            for name in names}
    for out in outs.values():
        if not is_uri(out):
            check_output_dir(out, "--out")
        check_split_output(out)
    init_ray(cfg, verbose=args.verbose)
    written = []
    for name in names:
        out = outs[name]
        image_dir = str(Path(args.image_dir) / name) if args.image_dir and len(names) > 1 else args.image_dir
        summary = write_split(cfg, name, out, num=args.num, image_dir=image_dir)
        print(f"wrote split {name!r}: {summary['rows']} rows, tasks={summary['tasks'] or ['(image only)']} -> {out}",
              file=sys.stderr)
        written.append(summary)
    return {"job": "make_world", "splits": written, "rows": sum(s["rows"] for s in written)}


if __name__ == "__main__":
    run_job(main)
