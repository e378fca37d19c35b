"""Import a labelled dataset in a standard format into an examples table (Ray Data).

Formats (one task each; details in docs/formats.md):
  imagefolder  classification  --images ROOT                      (ROOT/<class>/<image>)
  csv | json   classification  --annotations LIST [--images ROOT] (path,label rows / objects)
  coco         detection       --annotations instances.json --images DIR
  voc          segmentation    --images JPEGImages --labels SegmentationClass [--split-file ImageSets/.../x.txt]
  depth        depth           --images DIR --labels DIR --depth-scale S   (16-bit PNG; NYU 0.001, KITTI 1/256)
  normals      normals         --images DIR --labels DIR [--normals-convention opengl|opencv]
voc/depth/normals also take --annotations PAIRS.csv (columns image,label) instead of paired folders.

Examples:
  python jobs/import_dataset.py --format coco --annotations annotations/instances_val2017.json \
      --images val2017 --out tables/coco_val
  python jobs/import_dataset.py --format depth --images nyu/rgb --labels nyu/depth --depth-scale 0.001 --out tables/nyu

Rows that cannot be imported (missing/undecodable image, bad or missing label file, size mismatch)
go to <out>_quarantine with a reason; dataset-level inconsistencies (unknown category, annotation
for an image that is not listed) stop the job with an error naming the file (exit code 1).
"""
import sys

from must_ray.cli import init_ray, job_parser, load_job_config, parse_scale, run_job
from must_ray.typed_config import ConfigError


def main() -> dict:
    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    parser.add_argument("--format", required=True, metavar="FORMAT",
                        help="input format: imagefolder, csv, json, coco, voc, depth or normals (see above)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output examples table (directory, replaced)")
    parser.add_argument("--images", metavar="DIR", help="image root (ImageFolder root; folder the annotation paths "
                        "are relative to; image folder of paired formats)")
    parser.add_argument("--annotations", metavar="FILE",
                        help="COCO JSON, CSV/JSON list, or a pairs CSV (image,label) for voc/depth/normals")
    parser.add_argument("--labels", metavar="DIR", help="folder of label PNGs (voc masks, depth, normals)")
    parser.add_argument("--split-file", metavar="FILE", help="voc/depth/normals: keys to import, one per line "
                        "(e.g. VOC ImageSets/Segmentation/val.txt)")
    parser.add_argument("--classes", metavar="FILE|A,B,...", help="class names in id order (file: one per line)")
    parser.add_argument("--id-prefix", default="", help="prefix for every image_id (e.g. coco/val2017/)")
    parser.add_argument("--path-column", default="path", help="csv/json: column/key of the image path")
    parser.add_argument("--label-column", default="label", help="csv/json: column/key of the label")
    parser.add_argument("--depth-scale", type=parse_scale, metavar="S",
                        help="depth: metres per PNG unit (NYU 0.001, KITTI 1/256); the table stores depth at "
                             "tasks.depth.depth_scale of the config")
    parser.add_argument("--normals-convention", default="opengl", choices=("opengl", "opencv"),
                        help="normals: axes of the input maps (opencv = y down, z forward: y and z negated)")
    parser.add_argument("--normals-black-invalid", action="store_true",
                        help="normals: treat pure black (0,0,0) pixels as invalid")
    parser.add_argument("--rows-per-file", type=int, default=256, help="rows per Parquet file (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per Ray Data batch (default 32)")
    args = parser.parse_args()
    cfg = load_job_config(args)

    from must_ray.datasets.importers import FORMATS, DatasetError, prepare_import, run_import
    from must_ray.datasets.importers.common import check_shared_locations

    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format}: unknown format; known: {', '.join(FORMATS)}")
    try:
        # read the dataset's index first: dataset-level errors fail before Ray starts
        plan, task_cfg = prepare_import(
            args.format, cfg.tasks, images=args.images, annotations=args.annotations, labels=args.labels,
            split_file=args.split_file, classes=args.classes, id_prefix=args.id_prefix,
            path_column=args.path_column, label_column=args.label_column, depth_scale=args.depth_scale,
            normals_convention=args.normals_convention, normals_black_invalid=args.normals_black_invalid,
        )
        init_ray(cfg, verbose=args.verbose)
        # tasks on every node read the images/labels and write the table
        check_shared_locations([("--out", args.out), ("--images", args.images), ("--labels", args.labels)])
        summary = run_import(plan, args.out, task_cfg=task_cfg, rows_per_file=args.rows_per_file,
                             batch_size=args.batch_size, max_pixels=cfg.label.max_image_pixels)
    except DatasetError as exc:
        print(f"import error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"imported {summary['rows']} rows ({summary['quarantined']} quarantined) -> {summary['out']}",
          file=sys.stderr)
    return {"job": "import_dataset", **summary}


if __name__ == "__main__":
    run_job(main)
