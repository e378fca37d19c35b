"""The exported backbone loads in stock timm (folder, single file, classifier, features) and gives
the model's own features, for every backbone family; the job refuses what it must."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from must_ray.models import MultiTaskModel, images_to_tensor, save_model
from must_ray.models.backbone_export import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    export_backbone,
    export_program,
    load_exported_features,
)
from must_ray.models.backbones import feature_indices, timm_architecture
from must_ray.tasks import build_tasks
from must_ray.typed_config import ConfigError

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["test_resnet", "test_convnext", "test_vit_p8"]


def _model_file(tmp_path, backbone: str, seed: int = 0) -> tuple[str, MultiTaskModel]:
    """A tiny random model whose every backbone tensor (BN statistics too) is distinct noise, so
    any misplaced tensor changes the features."""
    torch.manual_seed(seed)
    model = MultiTaskModel(backbone, build_tasks(["classification", "depth"], 5), fpn_channels=16)
    with torch.no_grad():
        for name, t in model.backbone.state_dict().items():
            if t.is_floating_point():
                t.copy_(t + 0.1 * torch.randn_like(t).abs() if "var" in name else t + 0.1 * torch.randn_like(t))
    path = save_model(str(tmp_path / f"{backbone}.pt"), model.eval(), num_classes=5, task_cfgs={},
                      classes=list("abcde"), image_size=32, fpn_channels=16)
    return path, model.eval()


@pytest.mark.parametrize("backbone", FAMILIES)
def test_exported_backbone_gives_the_models_features_through_stock_timm(tmp_path, backbone):
    path, model = _model_file(tmp_path, backbone)
    out = tmp_path / "export"
    summary = export_backbone(path, str(out))
    assert summary["max_abs_diff"] < 1e-5
    config = json.loads((out / CONFIG_FILE).read_text())
    arch, _ = timm_architecture(backbone)
    assert config["architecture"] == arch and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert config["must_ray"]["classes"] == list("abcde")
    assert all("norm" in name for name in summary["untrained"]), summary["untrained"]

    x = torch.randn(2, 3, 48, 48)  # not the export size: the user's resolution
    indices = tuple(config["must_ray"]["feature_out_indices"])
    single_file = timm.create_model(arch, pretrained=True, features_only=True, out_indices=indices,
                                    pretrained_cfg_overlay=dict(file=str(out / WEIGHTS_FILE)),
                                    **config.get("model_args", {})).eval()
    with torch.no_grad():
        ours = model.backbone(x)
        for loaded in (load_exported_features(str(out)), single_file):
            theirs = loaded(x)
            assert len(theirs) == len(ours)
            assert max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) < 1e-5

    weights = safetensors.torch.load_file(str(out / WEIGHTS_FILE))
    for classifier in (timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=7),
                       timm.create_model(arch, pretrained=True, **{**config.get("model_args", {}), "num_classes": 7},
                                         pretrained_cfg_overlay=dict(file=str(out / WEIGHTS_FILE)))):
        own = classifier.state_dict()
        assert all(torch.equal(own[k], v) for k, v in weights.items())  # nothing silently left out
        assert classifier.eval()(x).shape == (2, 7)


def test_vit_preset_feeds_the_fpn_with_every_block_kept():
    model = MultiTaskModel("test_vit_p8", build_tasks(["segmentation", "detection"], 3), fpn_channels=16).eval()
    assert tuple(model.backbone.feature_info.out_indices) == (0, 2, 3, 5)  # 6 blocks, the last one always
    assert len(model.backbone.model.blocks) == 6
    with torch.no_grad():
        out = model(images_to_tensor(np.zeros((1, 40, 40, 3), np.uint8)))  # any size: dynamic_img_size
    assert out["segmentation"].shape[-2:] == (40, 40)
    assert feature_indices([2, 4, 8, 16, 32], 4) == (1, 2, 3, 4)  # a CNN keeps every level >= stride 4


def test_program_export_matches_the_model_on_uint8_images(tmp_path):
    _, model = _model_file(tmp_path, "test_resnet")
    path = export_program(model, 32, str(tmp_path / "m.pt2"))
    program = torch.export.load(path).module()
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        ours, theirs = model(images_to_tensor(images)), program(torch.from_numpy(images))
    assert float((ours["depth"] - theirs["depth"]).abs().max()) < 1e-4
    assert float((ours["classification"] - theirs["classification"]).abs().max()) < 1e-4


def test_export_refuses_to_replace_what_it_did_not_write(tmp_path):
    path, _ = _model_file(tmp_path, "test_resnet")
    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        export_backbone(path, str(other))
    with pytest.raises(ConfigError, match="not an exported backbone folder"):
        export_backbone(path, str(other), overwrite=True)
    assert (other / "keep.txt").exists()


def test_job_writes_the_folder_with_its_summary_line(tmp_path):
    path, _ = _model_file(tmp_path, "test_resnet")
    out = tmp_path / "exp"
    job = [sys.executable, str(REPO / "jobs" / "export_backbone.py"), "--model", path, "--out", str(out), "--no-verify"]
    ok = subprocess.run(job, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["job"] == "export_backbone" and summary["weights"] == str(out / WEIGHTS_FILE)
    assert (out / WEIGHTS_FILE).is_file() and summary["architecture"] == "test_resnet"
