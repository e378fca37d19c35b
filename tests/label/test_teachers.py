"""Teacher loading and adapters (must_ray/label/teachers/: the kind registry and one module per
kind): our checkpoints, random teachers, and the off-the-shelf timm / torchvision adapters with
random-init weights files written here."""
import numpy as np
import pytest
import torch

from must_ray.config import load_config
from must_ray.label.teachers import (
    Teacher,
    TeacherKind,
    TeacherSet,
    TeacherSpec,
    default_teacher_path,
    register_teacher_kind,
    resolve_teachers,
    teacher_kind,
    teacher_kind_names,
)
from must_ray.label.teachers.class_map import class_lut
from must_ray.label.teachers.kinds.timm_classifier import TimmClassifierTeacher
from must_ray.label.teachers.kinds.torchvision_detector import TorchvisionDetectorTeacher
from must_ray.label.teachers.kinds.torchvision_segmenter import TorchvisionSegmenterTeacher
from must_ray.models import MultiTaskModel, file_sha256, images_to_tensor, save_model
from must_ray.models.precision import autocast, resolve_precision, to_float32
from must_ray.table import rows_to_table, validate_table
from must_ray.tasks import build_task, build_tasks
from must_ray.tasks.classification import ClassificationConfig
from must_ray.tasks.detection import DetectionConfig
from must_ray.tasks.segmentation import SegmentationConfig
from must_ray.typed_config import ConfigError
from must_ray.world import CATEGORIES, render_scenes
from tests.conftest import REPO


def _cfg(tmp_path, *sets):
    return load_config(REPO / "jobs" / "configs" / "demo.yaml", [f"paths.root={tmp_path}", *sets])


def _images(n=3, size=64):
    return np.stack([s["image"] for s in render_scenes(0, range(n), image_size=size)])


def _rows(images, labels, tasks):
    rows = []
    for i in range(len(images)):
        row = {"image_id": f"x{i}", "image": b"png", "source": "test", "height": 64, "width": 64}
        for name, task in tasks.items():
            row.update(task.encode(labels[name][i]))
        rows.append(row)
    return rows_to_table(rows, list(tasks))


def test_missing_checkpoint_fails_fast_naming_task_path_and_dry_run(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError) as exc:
        resolve_teachers(cfg, ["depth"], 64)
    msg = str(exc.value)
    assert "label.teachers.depth" in msg and default_teacher_path(cfg, "depth") in msg
    assert "--set label.teachers.depth.kind=random" in msg


def test_checkpoint_teachers_share_a_file_hash_and_match_direct_forward(tmp_path):
    torch.manual_seed(0)
    shared = MultiTaskModel("test_resnet", build_tasks(["classification", "depth"], 5), fpn_channels=16).eval()
    path = save_model(str(tmp_path / "shared.pt"), shared, num_classes=5, task_cfgs={}, classes=list(CATEGORIES),
                      fpn_channels=16)
    cfg = _cfg(tmp_path, f"label.teachers.classification.path={path}", f"label.teachers.depth.path={path}",
               "tasks.classification.topk=3", "tasks.classification.temperature=2.0",
               "label.teachers.classification.input_size=null")  # at the images' 64 px, not the demo's 32
    specs, classes = resolve_teachers(cfg, ["classification", "depth"], 64)
    assert len(specs) == 1 and specs[0].tasks == ["classification", "depth"]  # one forward for both
    assert specs[0].sha256 == file_sha256(path) and classes == list(CATEGORIES)
    images = _images(3)
    out = TeacherSet(specs, cfg, classes, 64).predict(images)
    precision = resolve_precision(cfg.label.precision, "cpu")  # bf16 autocast where the CPU has native bf16
    with torch.no_grad(), autocast(precision, "cpu"):  # teachers run channels_last (faster CPU convolutions)
        raw = to_float32(shared.to(memory_format=torch.channels_last)(images_to_tensor(images, channels_last=True)))
    cls = build_task("classification", 5, cfg.tasks["classification"]).predict(raw["classification"], (64, 64))
    for a, b in zip(out["classification"], cls):
        assert len(a["topk_ids"]) == 3 and np.array_equal(a["topk_ids"], b["topk_ids"])
        assert np.array_equal(a["topk_probs"], b["topk_probs"])  # thresholds from cfg.tasks (temperature 2)
    depth = build_task("depth", 5).predict(raw["depth"], (64, 64))
    assert all(np.array_equal(a, b) for a, b in zip(out["depth"], depth))


def test_checkpoint_vocabulary_mismatch_is_a_config_error(tmp_path):
    paths = {}
    for task, classes in (("depth", ["a", "b", "c"]), ("normals", ["a", "b", "z"])):
        model = MultiTaskModel("test_resnet", build_tasks([task], 3), fpn_channels=16)
        paths[task] = save_model(str(tmp_path / f"{task}.pt"), model, num_classes=3, task_cfgs={}, classes=classes,
                                 fpn_channels=16)
    cfg = _cfg(tmp_path, f"label.teachers.depth.path={paths['depth']}", f"label.teachers.normals.path={paths['normals']}")
    specs, classes = resolve_teachers(cfg, ["depth"], 64)
    assert classes == ["a", "b", "c"]  # the vocabulary comes from the checkpoints
    with pytest.raises(ConfigError, match="vocabulary"):
        resolve_teachers(cfg, ["depth", "normals"], 64)  # two checkpoints that disagree
    with pytest.raises(ConfigError, match="vocabulary"):
        resolve_teachers(_cfg(tmp_path, f"label.teachers.depth.path={paths['depth']}", "label.classes=[x, y]"),
                         ["depth"], 64)


def test_random_teacher_is_deterministic_across_builds(tmp_path):
    cfg = _cfg(tmp_path, "label.teachers.segmentation.kind=random")
    a, _ = resolve_teachers(cfg, ["segmentation"], 64)
    b, _ = resolve_teachers(cfg, ["segmentation"], 64)
    assert a[0].sha256 == b[0].sha256  # same seed -> same weights -> same provenance hash (resume relies on it)
    c, _ = resolve_teachers(_cfg(tmp_path, "label.teachers.segmentation.kind=random",
                                 "label.teachers.segmentation.seed=1"), ["segmentation"], 64)
    assert c[0].sha256 != a[0].sha256


def test_off_the_shelf_adapters_with_random_init_pass_the_schema(tmp_path):
    import timm
    import torchvision

    torch.manual_seed(0)
    timm_path = tmp_path / "cls.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=5).state_dict(), timm_path)
    det_path = tmp_path / "det.pth"
    torch.save(torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                            weights_backbone=None, num_classes=6).state_dict(), det_path)
    seg_path = tmp_path / "seg.pth"
    torch.save(torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None,
                                            num_classes=6).state_dict(), seg_path)
    cfg = _cfg(tmp_path,
               "label.teachers.classification.kind=timm", "label.teachers.classification.model_name=test_efficientnet",
               f"label.teachers.classification.path={timm_path}",
               "label.teachers.detection.kind=torchvision_detector",
               "label.teachers.detection.model_name=fasterrcnn_mobilenet_v3_large_320_fpn",
               f"label.teachers.detection.path={det_path}", "tasks.detection.score_threshold=0.0",
               "label.teachers.segmentation.kind=torchvision_segmenter",
               "label.teachers.segmentation.model_name=lraspp_mobilenet_v3_large",
               f"label.teachers.segmentation.path={seg_path}", "tasks.segmentation.confidence_threshold=0.3",
               "label.teachers.depth.kind=random", "label.teachers.normals.kind=random")
    names = ["classification", "detection", "segmentation", "depth", "normals"]
    specs, classes = resolve_teachers(cfg, names, 64)
    assert {s.kind for s in specs} == {"timm", "torchvision_detector", "torchvision_segmenter", "random"}
    assert [s.sha256 for s in specs[:3]] == [file_sha256(str(p)) for p in (timm_path, det_path, seg_path)]
    teachers = TeacherSet(specs, cfg, classes, 64)
    images = _images(2)
    labels = teachers.predict(images)
    tasks = build_tasks(names, len(classes), cfg.tasks)
    table = _rows(images, labels, tasks)
    assert validate_table(table) == names and table.num_rows == 2
    assert all(0 <= c < 5 for c in table.column("cls_label").to_pylist())
    seg = tasks["segmentation"].decode({"seg_png": table.column("seg_png")[0].as_py()})
    assert seg.shape == (64, 64) and set(np.unique(seg)) <= set(range(6)) | {255}
    boxes = labels["detection"][0]["boxes"]
    assert boxes.size == 0 or (boxes.min() >= 0 and boxes.max() <= 1)
    # the timm weights really came from the file (not a fresh random init)
    ref = timm.create_model("test_efficientnet", num_classes=5)
    ref.load_state_dict(torch.load(timm_path, weights_only=True))
    timm_teacher = next(t for t in teachers.teachers if isinstance(t, TimmClassifierTeacher))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, timm_teacher.model.state_dict()[k])


class _FakeDetector(torch.nn.Module):
    def forward(self, images):
        boxes = torch.tensor([[0, 0, 32, 32], [1, 1, 32, 32], [40, 40, 60, 60], [10, 10, 20, 20], [5, 5, 6, 6]],
                             dtype=torch.float32)
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7, 0.2, 0.95]),
                 "labels": torch.tensor([1, 1, 3, 1, 7])} for _ in images]


def test_detector_adapter_maps_thresholds_nms_and_normalises():
    task = build_task("detection", 5, DetectionConfig(score_threshold=0.5, nms_iou=0.5, max_boxes=10))
    lut = class_lut({"1": 2, "3": 0}, [], 8, 5, "t")  # model class 7 is unmapped -> dropped
    teacher = TorchvisionDetectorTeacher("det", _FakeDetector(), task, lut, None)
    lab = teacher.predict(torch.zeros((1, 64, 64, 3), dtype=torch.uint8))["detection"][0]
    # box 1 is NMS'd by box 0 (same class, IoU > 0.5), box 3 under the threshold, box 4 unmapped
    assert lab["classes"].tolist() == [2, 0]
    assert np.allclose(lab["boxes"], [[0, 0, 0.5, 0.5], [40 / 64, 40 / 64, 60 / 64, 60 / 64]])
    assert np.allclose(lab["scores"], [0.9, 0.7])


class _FakeSegmenter(torch.nn.Module):
    def forward(self, x):
        logits = torch.zeros(x.shape[0], 4, x.shape[2], x.shape[3])
        logits[:, 2, :, : x.shape[3] // 2] = 10.0  # left half: model class 2, confidently
        logits[:, 3, :, x.shape[3] // 2:] = 0.5  # right half: class 3, barely
        return {"out": logits}


def test_segmenter_adapter_maps_classes_and_ignores_low_confidence():
    task = build_task("segmentation", 5, SegmentationConfig(confidence_threshold=0.5))
    lut = class_lut({"2": 4}, [], 4, 5, "t")  # model class 2 -> our category 4 (label 5); others background
    teacher = TorchvisionSegmenterTeacher("seg", _FakeSegmenter(), task, lut, None)
    seg = teacher.predict(torch.zeros((1, 16, 16, 3), dtype=torch.uint8))["segmentation"][0]
    assert (seg[:, :8] == 5).all()
    # right half: background mass = classes 0, 1, 3 summed (unmapped -> background) > 0.5 confidence
    assert (seg[:, 8:] == 0).all()
    strict = build_task("segmentation", 5, SegmentationConfig(confidence_threshold=0.99))
    seg = TorchvisionSegmenterTeacher("seg", _FakeSegmenter(), strict, lut, None).predict(
        torch.zeros((1, 16, 16, 3), dtype=torch.uint8))["segmentation"][0]
    assert (seg[:, 8:] == 255).all() and (seg[:, :8] == 5).all()


def test_timm_adapter_sums_mapped_mass_into_our_classes():
    class Fake(torch.nn.Module):
        def forward(self, x):
            return torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(x.shape[0], 1)

    task = build_task("classification", 3, ClassificationConfig(topk=2))
    lut = class_lut({"0": 1, "1": 1, "3": 0}, [], 4, 3, "t")  # class 2 unmapped: its mass is dropped
    lab = TimmClassifierTeacher("c", Fake(), task, lut, (0, 0, 0), (1, 1, 1), None).predict(
        torch.zeros((2, 8, 8, 3), dtype=torch.uint8))["classification"][0]
    assert lab["label"] == 0 and lab["topk_ids"].tolist() == [0, 1]
    assert np.allclose(lab["topk_probs"], [0.4, 0.3])


def test_class_map_accepts_torchvision_category_names():
    names = teacher_kind("torchvision_detector").class_names("fasterrcnn_mobilenet_v3_large_fpn", 91)
    assert names[1] == "person"
    lut = class_lut({"person": 0, "car": 2}, names, 91, 5, "t")
    assert lut[1] == 0 and lut[3] == 2 and (lut >= 0).sum() == 2
    with pytest.raises(ValueError, match="neither a class id nor a known class name"):
        class_lut({"unicorn": 0}, names, 91, 5, "t")


def test_off_the_shelf_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="needs a weights file"):
        _cfg(tmp_path, "label.teachers.detection.kind=torchvision_detector",
             "label.teachers.detection.model_name=fasterrcnn_mobilenet_v3_large_fpn")
    cfg = _cfg(tmp_path, "label.teachers.depth.kind=timm", "label.teachers.depth.model_name=resnet18",
               "label.teachers.depth.pretrained=true")
    with pytest.raises(ConfigError, match="labels classification, not depth"):
        resolve_teachers(cfg, ["depth"], 64)


class _ConstantDepthTeacher(Teacher):
    def __init__(self, metres):
        self.name, self.tasks, self.metres = "constant", ["depth"], metres

    def predict(self, images):
        return {"depth": [np.full(images.shape[1:3], self.metres, np.float32) for _ in range(images.shape[0])]}


@register_teacher_kind
class _ConstantDepthKind(TeacherKind):
    """A kind registered from the tests folder: a new kind is one class, nothing under must_ray/ changes."""

    name = "test_constant_depth"
    labels = ("depth",)
    provenance_keys = ("seed",)

    def spec(self, cfg, task, tcfg, files, classes, image_size):
        return TeacherSpec([task], self.name, "constant", cfg={"seed": tcfg.seed})

    def build(self, spec, cfg, classes, image_size, device):
        return _ConstantDepthTeacher(1.5 + spec.cfg["seed"])


def test_a_registered_kind_labels_through_the_registry(tmp_path):
    assert "test_constant_depth" in teacher_kind_names() and "checkpoint" in teacher_kind_names()
    cfg = _cfg(tmp_path, "label.teachers.depth.seed=1")
    cfg.label.teachers["depth"].kind = "test_constant_depth"  # past the config's Literal: the registry decides
    specs, classes = resolve_teachers(cfg, ["depth"], 64)
    assert [s.kind for s in specs] == ["test_constant_depth"] and classes == list(CATEGORIES)
    assert specs[0].provenance()["seed"] == 1
    labels = TeacherSet(specs, cfg, classes, 64).predict(_images(2))
    assert len(labels["depth"]) == 2 and np.all(labels["depth"][0] == 2.5)
    cfg.label.teachers["depth"].kind = "no_such_kind"
    with pytest.raises(ConfigError, match="unknown teacher kind 'no_such_kind'; known: backbone, checkpoint, random"):
        resolve_teachers(cfg, ["depth"], 64)
    with pytest.raises(ConfigError, match="labels depth, not normals"):
        cfg.label.teachers["normals"].kind = "test_constant_depth"
        resolve_teachers(cfg, ["normals"], 64)
    with pytest.raises(ValueError, match="registered twice"):
        register_teacher_kind(type("Other", (TeacherKind,), {"name": "test_constant_depth"}))


def test_backbone_teachers_label_features_from_a_timm_weights_file_or_a_model_file(tmp_path):
    import timm

    from must_ray.label.teachers.kinds.backbone import BackboneTeacher

    torch.manual_seed(0)
    timm_path = tmp_path / "backbone.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), timm_path)
    model_path = tmp_path / "teacher.pt"
    save_model(str(model_path), MultiTaskModel("test_resnet", {"depth": build_task("depth", 5)}, fpn_channels=16),
               num_classes=5, task_cfgs={}, classes=list(CATEGORIES[:5]), image_size=64, fpn_channels=16)
    images = _images(2)
    for source in (["label.teachers.features.model_name=test_resnet", f"label.teachers.features.path={timm_path}"],
                   [f"label.teachers.features.path={model_path}"]):
        cfg = _cfg(tmp_path, "label.teachers.features.kind=backbone", "tasks.features.dim=32", *source)
        specs, classes = resolve_teachers(cfg, ["features"], 64)
        assert specs[0].kind == "backbone" and specs[0].sha256 == file_sha256(source[-1].split("=", 1)[1])
        teachers = TeacherSet(specs, cfg, classes, 64)
        labels = teachers.predict(images)["features"]
        assert len(labels) == 2 and labels[0].shape == (4, 4, 32)  # 64 px at stride 16, 32 channels
        np.testing.assert_allclose(labels[0].mean(-1), 0, atol=1e-3)
        np.testing.assert_allclose(labels[0].std(-1), 1, atol=1e-2)
        teacher = teachers.teachers[0]
        assert isinstance(teacher, BackboneTeacher) and teacher.backbone.feature_info.reduction()[teacher.level] == 16
    ref = timm.create_model("test_resnet")  # the timm weights really came from the file
    ref.load_state_dict(torch.load(timm_path, weights_only=True))
    cfg = _cfg(tmp_path, "label.teachers.features.kind=backbone", "label.teachers.features.model_name=test_resnet",
               f"label.teachers.features.path={timm_path}")
    built = TeacherSet(resolve_teachers(cfg, ["features"], 64)[0], cfg, CATEGORIES, 64).teachers[0].backbone
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in built.state_dict().items())


def test_backbone_teacher_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"label.teachers.features: kind='backbone' needs a must-ray model file"):
        _cfg(tmp_path, "label.teachers.features.kind=backbone")
    with pytest.raises(ConfigError, match=r"model_name='resnet18' needs a weights file"):
        _cfg(tmp_path, "label.teachers.features.kind=backbone", "label.teachers.features.model_name=resnet18")
    (tmp_path / "plain.pth").write_bytes(b"not a model")
    cfg = _cfg(tmp_path, "label.teachers.features.kind=backbone", f"label.teachers.features.path={tmp_path}/plain.pth")
    with pytest.raises(ConfigError, match=r"features: .*plain.pth .*needs label.teachers.features.model_name"):
        resolve_teachers(cfg, ["features"], 64)
    cfg = _cfg(tmp_path, "label.teachers.depth.kind=backbone", f"label.teachers.depth.path={tmp_path}/plain.pth")
    with pytest.raises(ConfigError, match="kind='backbone' labels features, not depth"):
        resolve_teachers(cfg, ["depth"], 64)
    cfg = _cfg(tmp_path, "label.teachers.features.kind=backbone", f"label.teachers.features.path={tmp_path}/none.pt")
    with pytest.raises(ConfigError, match="backbone weights file not found"):
        resolve_teachers(cfg, ["features"], 64)
