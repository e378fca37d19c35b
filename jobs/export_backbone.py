"""Export a model's backbone for stock timm: a Hugging Face timm folder (model.safetensors + config.json).

Examples:
  python jobs/export_backbone.py             # the run's student -> <paths.root>/<paths.student>/timm_backbone/
  python jobs/export_backbone.py --model out/teachers/depth/model.pt --out exports/depth_backbone
  python jobs/export_backbone.py --program   # also the whole multi-task model (torch.export)

Any must-ray model file works (the student or a teacher). The folder loads offline with
  timm.create_model("local-dir:FOLDER", pretrained=True, num_classes=N)       # classifier to fine-tune
  timm.create_model("local-dir:FOLDER", pretrained=True, features_only=True) # feature maps
or, once pushed unchanged to the Hugging Face hub, "hf-hub:USER/NAME". docs/finetune.md has a
fine-tuning example. By default the folder is reloaded through timm and the largest difference
of its feature maps from the model's own is reported (max_abs_diff).
"""
import os

from must_ray.cli import job_parser, load_job_config, run_job

EXPORT_DIR = "timm_backbone"


def main() -> dict:
    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    parser.add_argument("--model", metavar="FILE",
                        help="must-ray model file (default: the run's student, <paths.root>/<paths.student>/model.pt)")
    parser.add_argument("--out", metavar="DIR", help=f"folder to write (default: {EXPORT_DIR}/ beside the model file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    parser.add_argument("--program", action="store_true",
                        help="also write multitask.pt2: every task head, torch.export, uint8 images in")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip reloading the folder through timm to compare feature maps")
    args = parser.parse_args()
    cfg = load_job_config(args)

    from must_ray.io import MODEL_FILE
    from must_ray.models import check_model_file
    from must_ray.models.backbone_export import export_backbone

    model = args.model or os.path.join(cfg.paths.resolve("student"), MODEL_FILE)
    check_model_file(model, "--model")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(model)), EXPORT_DIR)
    return export_backbone(model, out, overwrite=args.overwrite, verify=args.verify, program=args.program)


if __name__ == "__main__":
    run_job(main)
