"""Object detection (2D boxes), CenterNet-style and anchor-free.

**Label**: ``{"boxes": float32 (n, 4), "classes": int32 (n,), "scores": float32 (n,)}`` with boxes
normalised ``x0, y0, x1, y1`` in [0, 1], classes in [0, C) and scores 1 for ground truth. ``n``
may be 0 (an image without objects is a label, not a missing one).

**Columns**: ``det_boxes`` list<float32> (flattened ``4n``; presence column), ``det_classes``
list<int32>, ``det_scores`` list<float32>. No boxes = empty lists, not null.

**Head** (:class:`CenterNetHead`): all pyramid levels fused onto the stride-4 level (16x16 at a
64x64 input; the nearest level if the pyramid has no stride 4), then three small conv branches:

* ``heatmap`` (C, logits): one peak per object centre and class;
* ``size`` (2): log of the box width/height in grid cells — the log makes a 2-pixel and a
  60-pixel box equally easy to regress, so small objects at 64x64 are representable;
* ``offset`` (2): the sub-cell position of the centre (centre = cell + offset), so box positions
  are not quantised to the 4-pixel grid.

**Loss**: penalty-reduced focal loss (CenterNet, alpha=2, beta=4) against elliptical Gaussians
splatted at the centre cells (TTFNet-style, sigma = 0.54 * size / 6 per axis, peak exactly 1),
normalised by the number of objects; plus L1 on log-size and offset at the centre cells. The
targets only carry padded boxes; the heatmap is built inside :meth:`DetectionTask.loss` from the
output's grid, so the head's stride never has to be known by the loader.

**Predict** (teacher adapter): sigmoid heatmap, 3x3 max-pool peak extraction, top-K peaks, scores
>= ``cfg.score_threshold``, boxes decoded and clipped to [0, 1], class-wise NMS
(``torchvision.ops.batched_nms``, ``cfg.nms_iou``), at most ``cfg.max_boxes`` per image.

**Metric**: COCO-style AP (greedy matching in score order, 101-point interpolated precision)
per class with ground truth, averaged over those classes: ``map50`` (primary, IoU 0.5) and ``map``
(mean over IoU 0.50:0.05:0.95); also ``map75``. The state keeps per-image detections and ground
truth (merge = concatenation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torchvision.ops import batched_nms
from torchvision.utils import draw_bounding_boxes

from must_ray.tasks import TaskConfig, register_task
from must_ray.tasks._drawing import box_rect, class_colour, draw_tag, font
from must_ray.tasks._layers import FeatureFuser, as_array, is_null, label_rows, pick_level, select_rows
from must_ray.tasks.base import Crop, Task, zero_loss
from must_ray.typed_config import ConfigError

IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
GAUSSIAN_ALPHA = 0.54  # TTFNet: sigma = alpha * side / 6
HEATMAP_PRIOR = 0.1  # initial heatmap probability (bias = logit(prior)), as in CenterNet
MIN_KEEP_FRACTION = 0.25  # augment drops boxes keeping less of their area than this
MIN_SIDE_CELLS = 1e-3  # floor of a box side (grid cells) before taking the log


@dataclass
class DetectionConfig(TaskConfig):
    """Knobs of detection (``tasks.detection``): a teacher's box post-processing."""

    score_threshold: float = 0.3  # boxes scoring below are dropped
    nms_iou: float = 0.5  # class-wise NMS overlap
    max_boxes: int = 20  # per image
    postprocess_knobs = ("score_threshold", "nms_iou", "max_boxes")

    def validate(self, key: str) -> None:
        super().validate(key)
        for name in ("score_threshold", "nms_iou"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{key}.{name} must be in [0, 1], got {v}")
        if self.max_boxes < 1:
            raise ConfigError(f"{key}.max_boxes must be >= 1, got {self.max_boxes}")


def make_label(boxes: Any = None, classes: Any = None, scores: Any = None) -> dict[str, np.ndarray]:
    """A detection label in canonical dtypes/shapes; ``scores`` default to 1 (ground truth)."""
    b = np.asarray([] if boxes is None else boxes, dtype=np.float32).reshape(-1, 4)
    c = np.asarray([] if classes is None else classes, dtype=np.int32).reshape(-1)
    s = np.ones(len(b), dtype=np.float32) if scores is None else np.asarray(scores, dtype=np.float32).reshape(-1)
    if not len(b) == len(c) == len(s):
        raise ValueError(f"detection label with {len(b)} boxes, {len(c)} classes, {len(s)} scores")
    return {"boxes": b, "classes": c, "scores": s}


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes."""
    a = a.astype(np.float64).reshape(-1, 4)
    b = b.astype(np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def average_precision(tp: np.ndarray, num_gt: int) -> float:
    """COCO 101-point interpolated AP of detections already sorted by descending score
    (``tp`` 1 = true positive, 0 = false positive) against ``num_gt`` ground-truth boxes."""
    if num_gt <= 0:
        raise ValueError("AP is undefined without ground truth")
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp, dtype=np.float64)
    cfp = np.cumsum(1 - tp, dtype=np.float64)
    recall = ctp / num_gt
    precision = ctp / (ctp + cfp)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone envelope
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(q.mean())


def match_detections(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """COCO greedy matching for one image and class: ``ious`` (D, G) with detections in descending
    score order. Returns (T, D) bool true-positive flags: each detection takes the unmatched
    ground truth it overlaps most, if that IoU >= the threshold."""
    d, g = ious.shape
    tp = np.zeros((len(thresholds), d), dtype=bool)
    if g == 0:
        return tp
    for ti, t in enumerate(thresholds):
        taken = np.zeros(g, dtype=bool)
        for di in range(d):
            cand = np.where(taken, -1.0, ious[di])
            best = int(cand.argmax())
            if cand[best] >= t:
                taken[best] = True
                tp[ti, di] = True
    return tp


# ----------------------------------------------------------------------------- targets (torch)


def center_targets(boxes: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per-box CenterNet quantities on an ``(H, W)`` grid for padded normalised boxes (N, M, 4):
    integer centre cell ``ix``/``iy``, flat index ``ind``, sub-cell ``offset`` (N, M, 2) and
    ``log_size`` (N, M, 2) in cells. Padding rows (``valid`` False) get harmless zeros."""
    h, w = grid
    boxes = torch.where(valid[..., None], boxes, torch.zeros_like(boxes)).float()
    cx = (boxes[..., 0] + boxes[..., 2]) * 0.5 * w
    cy = (boxes[..., 1] + boxes[..., 3]) * 0.5 * h
    ix = cx.floor().clamp(0, w - 1)
    iy = cy.floor().clamp(0, h - 1)
    bw = ((boxes[..., 2] - boxes[..., 0]) * w).clamp(min=MIN_SIDE_CELLS)
    bh = ((boxes[..., 3] - boxes[..., 1]) * h).clamp(min=MIN_SIDE_CELLS)
    return {
        "ix": ix.long(), "iy": iy.long(), "ind": (iy * w + ix).long(),
        "offset": torch.stack([cx - ix, cy - iy], dim=-1),
        "log_size": torch.stack([bw.log(), bh.log()], dim=-1),
        "size": torch.stack([bw, bh], dim=-1),
    }


def center_heatmap(boxes: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor, num_classes: int,
                   grid: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) target heatmap: an elliptical Gaussian per box centred on its centre cell
    (value exactly 1 there), class-wise maximum where objects overlap."""
    n, m = valid.shape
    h, w = grid
    ct = center_targets(boxes, valid, grid)
    sigma = (GAUSSIAN_ALPHA * ct["size"] / 6.0).clamp(min=1e-2)  # (N, M, 2)
    xs = torch.arange(w, dtype=torch.float32, device=boxes.device)
    ys = torch.arange(h, dtype=torch.float32, device=boxes.device)
    dx = xs.view(1, 1, 1, w) - ct["ix"].float().view(n, m, 1, 1)
    dy = ys.view(1, 1, h, 1) - ct["iy"].float().view(n, m, 1, 1)
    g = torch.exp(-(dx ** 2 / (2 * sigma[..., 0].view(n, m, 1, 1) ** 2)
                    + dy ** 2 / (2 * sigma[..., 1].view(n, m, 1, 1) ** 2)))
    g = g * valid.view(n, m, 1, 1)
    heat = torch.zeros(n, num_classes, h * w, device=boxes.device)
    cls = classes.clamp(0, num_classes - 1).long().view(n, m, 1).expand(n, m, h * w)
    heat.scatter_reduce_(1, cls, g.view(n, m, h * w), reduce="amax", include_self=True)
    return heat.view(n, num_classes, h, w)


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (alpha=2, beta=4) on logits, summed and
    normalised by the number of centre cells (heat == 1). Computed with log-sigmoids (stable)."""
    pos = heat >= 1.0
    p = torch.sigmoid(logits)
    pos_term = F.logsigmoid(logits) * (1 - p) ** 2
    neg_term = F.logsigmoid(-logits) * p ** 2 * (1 - heat) ** 4
    total = torch.where(pos, pos_term, neg_term).sum()
    return -total / pos.sum().clamp(min=1)


def gather_cells(x: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
    """Values of a (N, K, H, W) map at flat cell indices ``ind`` (N, M) -> (N, M, K)."""
    n, k = x.shape[:2]
    flat = x.reshape(n, k, -1)
    return flat.gather(2, ind.unsqueeze(1).expand(n, k, ind.shape[1])).permute(0, 2, 1)


# ----------------------------------------------------------------------------- head


class CenterNetHead(nn.Module):
    """Fused stride-4 trunk and three conv branches: ``heatmap`` (C), ``size`` (2), ``offset`` (2)."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], num_classes: int, width: int = 64,
                 min_stride: int = 4):
        super().__init__()
        self.fuse = FeatureFuser(channels, strides, width, pick_level(strides, min_stride))

        def branch(out: int, bias: float) -> nn.Sequential:
            last = nn.Conv2d(width, out, 1)
            nn.init.constant_(last.bias, bias)
            return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), last)

        self.heatmap = branch(num_classes, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        self.size = branch(2, 0.0)
        self.offset = branch(2, 0.5)

    def forward(self, feats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.fuse(feats)
        return {"heatmap": self.heatmap(x), "size": self.size(x), "offset": self.offset(x)}


# ----------------------------------------------------------------------------- task


@register_task
class DetectionTask(Task):
    """Anchor-free box detection over ``num_classes`` categories."""

    name = "detection"
    primary_metric = "map50"
    metric_units = {"map50": "0-1", "map": "0-1", "map75": "0-1"}
    higher_is_better = True
    dense = False
    config_class = DetectionConfig
    probe = None  # a box decoder is not a linear read-out
    #: loss weights of the size and offset regressions relative to the heatmap focal loss
    size_weight: float = 1.0
    offset_weight: float = 1.0

    # ------------------------------------------------------------------ table
    @classmethod
    def columns(cls) -> list[pa.Field]:
        return [
            pa.field("det_boxes", pa.list_(pa.float32()), nullable=True),
            pa.field("det_classes", pa.list_(pa.int32()), nullable=True),
            pa.field("det_scores", pa.list_(pa.float32()), nullable=True),
        ]

    def encode(self, label: Any) -> dict[str, Any]:
        if label is None:
            return self.null_cells()
        lab = make_label(label.get("boxes"), label.get("classes"), label.get("scores"))
        return {"det_boxes": lab["boxes"].reshape(-1).tolist(), "det_classes": lab["classes"].tolist(),
                "det_scores": lab["scores"].tolist()}

    def decode(self, cells: dict[str, Any]) -> Any:
        if is_null(cells.get("det_boxes")):
            return None
        boxes = as_array(cells.get("det_boxes"), np.float32)
        classes = as_array(cells.get("det_classes"), np.int32)
        scores = cells.get("det_scores")
        scores = None if is_null(scores) else as_array(scores, np.float32)
        return make_label(boxes, classes, scores)

    # ------------------------------------------------------------------ augmentation
    def augment(self, label: Any, crop: Crop, out_size: tuple[int, int]) -> Any:
        """Map boxes into the crop window and rescale to [0, 1]; clip; drop boxes that keep less
        than a quarter of their area or less than one output pixel; mirror x on flips."""
        if label is None:
            return None
        lab = make_label(label.get("boxes"), label.get("classes"), label.get("scores"))
        if crop.is_identity:
            return lab
        b = lab["boxes"].astype(np.float64)
        ww, wh = crop.x1 - crop.x0, crop.y1 - crop.y0
        x0, x1 = (b[:, 0] - crop.x0) / ww, (b[:, 2] - crop.x0) / ww
        y0, y1 = (b[:, 1] - crop.y0) / wh, (b[:, 3] - crop.y0) / wh
        area = (x1 - x0) * (y1 - y0)
        cx0, cx1, cy0, cy1 = (np.clip(v, 0.0, 1.0) for v in (x0, x1, y0, y1))
        clipped = np.clip(cx1 - cx0, 0, None) * np.clip(cy1 - cy0, 0, None)
        keep = (clipped >= MIN_KEEP_FRACTION * area) & (clipped * out_size[0] * out_size[1] >= 1.0)
        keep &= (cx1 > cx0) & (cy1 > cy0)
        if crop.flip:
            cx0, cx1 = 1.0 - cx1, 1.0 - cx0
        boxes = np.stack([cx0, cy0, cx1, cy1], axis=1)[keep]
        return make_label(boxes, lab["classes"][keep], lab["scores"][keep])

    # ------------------------------------------------------------------ model side
    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return CenterNetHead(channels, strides, self.num_classes)

    def targets(self, labels: Sequence[Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Padded boxes: ``boxes`` (B, M, 4) float32 normalised, ``classes`` (B, M) int64,
        ``valid`` (B, M) bool (M = most boxes in the batch, at least 1), and ``mask`` (B,).
        Boxes with class ids outside [0, C) or no extent are dropped."""
        labs = [None if lab is None else make_label(lab.get("boxes"), lab.get("classes"), lab.get("scores"))
                for lab in labels]
        keeps = [None if lab is None else
                 ((lab["classes"] >= 0) & (lab["classes"] < self.num_classes)
                  & (lab["boxes"][:, 2] > lab["boxes"][:, 0]) & (lab["boxes"][:, 3] > lab["boxes"][:, 1]))
                 for lab in labs]
        m = max([1] + [int(k.sum()) for k in keeps if k is not None])
        b = len(labels)
        boxes = np.zeros((b, m, 4), dtype=np.float32)
        classes = np.zeros((b, m), dtype=np.int64)
        valid = np.zeros((b, m), dtype=bool)
        for i, (lab, keep) in enumerate(zip(labs, keeps)):
            if lab is None:
                continue
            n = int(keep.sum())
            boxes[i, :n] = lab["boxes"][keep]
            classes[i, :n] = lab["classes"][keep]
            valid[i, :n] = True
        return {"boxes": torch.from_numpy(boxes), "classes": torch.from_numpy(classes),
                "valid": torch.from_numpy(valid), "mask": label_rows(labels)}

    def loss(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Focal heatmap loss + weighted L1 size/offset losses over the labelled rows only."""
        device = outputs["heatmap"].device
        mask = targets["mask"].to(device)
        if not bool(mask.any()):
            return zero_loss(outputs)
        out = select_rows(outputs, mask)
        boxes = targets["boxes"].to(device)[mask]
        classes = targets["classes"].to(device)[mask]
        valid = targets["valid"].to(device)[mask]
        grid = tuple(out["heatmap"].shape[-2:])
        heat = center_heatmap(boxes, classes, valid, self.num_classes, grid)
        loss = focal_loss(out["heatmap"].float(), heat)
        ct = center_targets(boxes, valid, grid)
        num = valid.sum().clamp(min=1) * 2
        v = valid.unsqueeze(-1)
        size_err = (gather_cells(out["size"].float(), ct["ind"]) - ct["log_size"]).abs()
        off_err = (gather_cells(out["offset"].float(), ct["ind"]) - ct["offset"]).abs()
        zero = size_err.new_zeros(())
        loss = loss + self.size_weight * torch.where(v, size_err, zero).sum() / num
        loss = loss + self.offset_weight * torch.where(v, off_err, zero).sum() / num
        return loss

    def predict(self, outputs: dict[str, torch.Tensor], image_size: tuple[int, int]) -> list[Any]:
        """Peaks of the heatmap -> boxes, thresholded, NMS'd, at most ``cfg.max_boxes`` each."""
        with torch.no_grad():
            heat = torch.sigmoid(outputs["heatmap"].detach().float()).cpu()
            size = outputs["size"].detach().float().cpu()
            offset = outputs["offset"].detach().float().cpu()
            b, c, h, w = heat.shape
            peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
            k = min(c * h * w, max(100, int(self.cfg.max_boxes)))
            scores, idx = peaks.reshape(b, -1).topk(k, dim=1)
            cls = idx // (h * w)
            pix = idx % (h * w)
            off = gather_cells(offset, pix)  # (B, K, 2)
            wh = gather_cells(size, pix).clamp(max=math.log(4.0 * max(h, w))).exp()
            cx = ((pix % w).float() + off[..., 0]) / w
            cy = ((pix // w).float() + off[..., 1]) / h
            bw, bh = wh[..., 0] / w, wh[..., 1] / h
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1).clamp(0.0, 1.0)
            results = []
            for i in range(b):
                keep = (scores[i] >= self.cfg.score_threshold) & (scores[i] > 0)
                keep &= (boxes[i, :, 2] > boxes[i, :, 0]) & (boxes[i, :, 3] > boxes[i, :, 1])
                bx, sc, cl = boxes[i][keep], scores[i][keep], cls[i][keep]
                order = batched_nms(bx, sc, cl, float(self.cfg.nms_iou))[: int(self.cfg.max_boxes)]
                results.append(make_label(bx[order].numpy(), cl[order].numpy(), sc[order].numpy()))
        return results

    # ------------------------------------------------------------------ evaluation
    def metric_state(self) -> dict[str, list]:
        return {"images": []}

    def metric_update(self, state: dict, preds: Sequence[Any], gts: Sequence[Any]) -> dict:
        if len(preds) != len(gts):
            raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
        images = list(state["images"])
        for p, g in zip(preds, gts):
            if g is None:
                continue
            g = make_label(g.get("boxes"), g.get("classes"), g.get("scores"))
            p = make_label() if p is None else make_label(p.get("boxes"), p.get("classes"), p.get("scores"))
            images.append((p["boxes"], p["scores"], p["classes"], g["boxes"], g["classes"]))
        return {"images": images}

    def metric_merge(self, a: dict, b: dict) -> dict:
        return {"images": list(a["images"]) + list(b["images"])}

    def metric_compute(self, state: dict) -> dict[str, float]:
        images = state["images"]
        classes = sorted({int(c) for im in images for c in im[4]})
        aps = np.zeros((len(classes), len(IOU_THRESHOLDS)))
        for ci, c in enumerate(classes):
            scores: list[np.ndarray] = []
            tps: list[np.ndarray] = []
            num_gt = 0
            for pb, ps, pc, gb, gc in images:
                gsel = gb[gc == c]
                num_gt += len(gsel)
                psel = pc == c
                if not psel.any():
                    continue
                order = np.argsort(-ps[psel], kind="mergesort")
                dets, dscore = pb[psel][order], ps[psel][order]
                tps.append(match_detections(box_iou_np(dets, gsel), IOU_THRESHOLDS))
                scores.append(dscore)
            if not scores:
                continue  # AP 0 at every threshold
            all_scores = np.concatenate(scores)
            all_tp = np.concatenate(tps, axis=1)
            order = np.argsort(-all_scores, kind="mergesort")
            for ti in range(len(IOU_THRESHOLDS)):
                aps[ci, ti] = average_precision(all_tp[ti, order].astype(np.float64), num_gt)
        if not classes:
            return {"map50": 0.0, "map": 0.0, "map75": 0.0}
        per_t = aps.mean(axis=0)
        return {"map50": float(per_t[0]), "map": float(per_t.mean()), "map75": float(per_t[5])}

    # ------------------------------------------------------------------ baselines
    def trivial_prediction(self, gts: Sequence[Any]) -> list[Any]:
        """No boxes for any image (mAP 0): the floor a detector must clear."""
        return [None if g is None else make_label() for g in gts]

    # ------------------------------------------------------------------ the synthetic world
    def world_label(self, buffers: Mapping[str, Any]) -> Any:
        """One tight box per instance with enough visible pixels (``instance_visible``)."""
        keep = np.asarray(buffers["instance_visible"], dtype=bool)
        return make_label(np.asarray(buffers["instance_boxes"])[keep], np.asarray(buffers["instance_categories"])[keep])

    # ------------------------------------------------------------------ drawing (the label grid)
    def draw(self, label: Any, image: np.ndarray, *, class_names: Sequence[str] = (),
             value_range: tuple[float, float] | None = None) -> np.ndarray:
        """The image with every box outlined in its class colour (torchvision's
        ``draw_bounding_boxes``, 2 px) and a tag with its class name (and score below 1);
        higher-scoring boxes are drawn over lower ones, tags over boxes."""
        lab = make_label(label.get("boxes"), label.get("classes"), label.get("scores"))
        if not len(lab["boxes"]):
            return np.array(image, dtype=np.uint8, copy=True)
        h, w = image.shape[:2]
        order = np.argsort(lab["scores"], kind="stable")
        rects = [box_rect(lab["boxes"][i], w, h) for i in order]
        colours = [class_colour(lab["classes"][i]) for i in order]
        chw = torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)).permute(2, 0, 1)
        boxed = draw_bounding_boxes(chw, torch.tensor(rects, dtype=torch.int64), colors=colours, width=2)
        img = Image.fromarray(boxed.permute(1, 2, 0).numpy())
        draw, fnt = ImageDraw.Draw(img), font(10)
        for i, rect, colour in zip(order, rects, colours):
            c, score = int(lab["classes"][i]), float(lab["scores"][i])
            text = class_names[c] if 0 <= c < len(class_names) else str(c)
            text += f" {score:.2f}" if score < 0.995 else ""
            draw_tag(draw, rect, text, colour, fnt, w)
        return np.asarray(img)
