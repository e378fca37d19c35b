"""Export an examples table (e.g. pseudo labels) to standard formats.

Formats (details in docs/formats.md):
  coco      detection       OUT/coco.json (boxes xywh in pixels + scores) and OUT/coco_results.json
  masks     segmentation    OUT/masks/<stem>.png   palette PNG, VOC convention (0 = background, 255 = ignore)
  depth     depth           OUT/depth/<stem>.png   16-bit PNG in units of --depth-scale metres, 0 = invalid
  normals   normals         OUT/normals/<stem>.png RGB PNG, n = rgb / 127.5 - 1
  topk-csv  classification  OUT/topk.csv           image_id,rank,class_id,class_name,prob
  all       every format the table has columns for
OUT/files.csv maps each image_id to its file stem (and COCO image id).

Examples:
  python jobs/export_labels.py --table out/demo/labels --format all --out exports/labels
  python jobs/export_labels.py --table tables/kitti_pseudo --format depth --depth-scale 1/256 --out exports/kitti
"""
import sys

from must_ray.cli import init_ray, job_parser, load_job_config, parse_scale, run_job
from must_ray.typed_config import ConfigError


def main() -> dict:
    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    parser.add_argument("--table", required=True, metavar="PATH", help="examples table (directory or .parquet file)")
    parser.add_argument("--format", action="append", required=True,
                        choices=("coco", "masks", "depth", "normals", "topk-csv", "all"),
                        help="output format (repeatable)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--depth-scale", type=parse_scale, default=0.001, metavar="S",
                        help="depth: metres per PNG unit (default 0.001 = mm as NYU; KITTI 1/256)")
    parser.add_argument("--normals-convention", default="opengl", choices=("opengl", "opencv"),
                        help="normals: axes of the written maps (opencv = y down, z forward)")
    parser.add_argument("--coco-categories", metavar="FILE|TABLE",
                        help="coco: take category ids (matched by class name) from this COCO JSON or imported "
                             "table, for tables without source_class_ids (e.g. pseudo labels)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per Ray Data batch for PNG files")
    args = parser.parse_args()
    cfg = load_job_config(args)

    from must_ray.datasets.exporters import export_labels
    from must_ray.datasets.importers import DatasetError
    from must_ray.datasets.importers.common import check_shared_locations
    from must_ray.table import TableNotFoundError, table_files

    try:
        _, files = table_files(args.table)
    except TableNotFoundError:
        raise ConfigError(f"--table {args.table}: no such file or folder; give an examples table (a folder of "
                          "Parquet files such as out/demo/labels, or one .parquet file)") from None
    if not files:
        raise ConfigError(f"--table {args.table}: the folder holds no Parquet files, so it is not an examples table")
    try:
        needs_ray = any(f in ("masks", "depth", "normals", "all") for f in args.format)
        if needs_ray:
            init_ray(cfg, verbose=args.verbose)
            # tasks on every node read the table and write the PNG files
            check_shared_locations([("--table", args.table), ("--out", args.out)])
        summary = export_labels(args.table, args.out, args.format, depth_scale=args.depth_scale,
                                normals_convention=args.normals_convention, batch_size=args.batch_size,
                                coco_categories=args.coco_categories)
    except DatasetError as exc:
        print(f"export error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"exported {summary['images_exported']} images ({', '.join(summary['formats'])}) -> {summary['out']}",
          file=sys.stderr)
    for task, why in summary["not_exported"].items():
        print(f"not exported: {task} ({why})", file=sys.stderr)
    return {"job": "export_labels", **summary}


if __name__ == "__main__":
    run_job(main)
