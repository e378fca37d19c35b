"""Fine-tune exported backbones with plain PyTorch + timm on a domain none of them saw (docs/finetune.md).

  python docs/examples/finetune.py --backbone student=out/demo/student/timm_backbone \
      --backbone depth=out/demo/teachers/depth/timm_backbone --random

Each backbone folder (jobs/export_backbone.py) becomes a timm classifier with a new head; all of
them get the same recipe on the same labelled split of the world's ``--domain`` (classification:
the category of the most visible object), and are scored on a held-out split of it. ``--random``
adds the same architecture from random init. Prints a Markdown table and a JSON line.
"""
import argparse
import json
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

from must_ray.world.labels import render_labelled
from must_ray.world.scenes import CATEGORIES


def world_split(domain: str, first: int, num: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, S, S), normalised as the backbones were trained, and class ids (N,)."""
    scenes = render_labelled(0, range(first, first + num), tasks=["classification"], image_size=size,
                             domain=domain, min_objects=2, max_objects=4)
    x = torch.from_numpy(np.stack([s["image"] for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor([s["classification"]["label"] for s in scenes])


def fine_tune(model: torch.nn.Module, train, test, epochs: int, lr: float, batch: int, seed: int) -> float:
    """Full fine-tune (AdamW, cosine, flips) -> top-1 on ``test``."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(train[0]) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(train[0])).split(batch):
            x, y = train[0][idx], train[1][idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(3), x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x in test[0].split(256)])
    return float((pred == test[1]).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", action="append", default=[], metavar="NAME=FOLDER", help="an exported backbone")
    p.add_argument("--random", action="store_true", help="add a random-init row (the first backbone's architecture)")
    p.add_argument("--domain", default="cluttered", help="world domain: default, dim, bright, cluttered")
    p.add_argument("--train", type=int, default=256, help="labelled images to fine-tune on")
    p.add_argument("--test", type=int, default=512, help="held-out images to score")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seeds", type=int, default=2, help="fine-tunes per backbone (mean and spread reported)")
    args = p.parse_args()
    folders = dict(b.split("=", 1) for b in args.backbone)
    if not folders:
        p.error("give at least one --backbone NAME=FOLDER")
    config = json.load(open(f"{next(iter(folders.values()))}/config.json"))
    size = config["pretrained_cfg"]["input_size"][-1]
    train = world_split(args.domain, 700_000, args.train, size)
    test = world_split(args.domain, 750_000, args.test, size)

    def build(name: str) -> torch.nn.Module:
        if name == "random init":
            return timm.create_model(config["architecture"], **{**config.get("model_args", {}),
                                                                  "num_classes": len(CATEGORIES)})
        return timm.create_model(f"local-dir:{folders[name]}", pretrained=True, num_classes=len(CATEGORIES))

    majority = int(train[1].bincount().argmax())  # the trivial baseline: always the train split's commonest class
    trivial = float((test[1] == majority).float().mean())
    rows = {"majority class (no training)": {"top1": trivial, "spread": 0.0, "s": 0.0}}
    for name in list(folders) + (["random init"] if args.random else []):
        t0 = time.time()
        scores = [fine_tune(build(name), train, test, args.epochs, args.lr, args.batch, seed)
                  for seed in range(args.seeds)]
        rows[name] = {"top1": float(np.mean(scores)), "spread": float(np.ptp(scores)), "s": time.time() - t0}
    print(f"| backbone | top-1 ({args.domain}, {args.train} train / {args.test} test images) | spread | seconds |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['top1']:.3f} | {r['spread']:.3f} | {r['s']:.0f} |")
    print(json.dumps({"domain": args.domain, "train": args.train, "test": args.test, "epochs": args.epochs,
                      "seeds": args.seeds, "rows": rows}))


if __name__ == "__main__":
    main()
