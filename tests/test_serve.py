"""The student on Ray Serve, through a real HTTP client on loopback: every task's prediction (the
labeller's own), concurrent requests, and a 4xx with a message for every bad request."""
import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from must_ray.config import load_config
from must_ray.label.teachers import TeacherSet, TeacherSpec
from must_ray.models import MultiTaskModel, save_model
from must_ray.tasks import build_tasks, default_task_names
from tests.conftest import REPO

CLASSES = ["cube", "ball", "cone", "ring", "slab"]
SIZE = 32


def _png(seed: int, side: int = SIZE) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ray import serve

    from must_ray.serve.run import start_app

    tmp = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    tasks = default_task_names()
    model = MultiTaskModel("test_resnet", build_tasks(tasks, len(CLASSES)), fpn_channels=16).eval()
    path = save_model(str(tmp / "student.pt"), model, num_classes=len(CLASSES), task_cfgs={}, classes=CLASSES,
                      image_size=SIZE, fpn_channels=16)
    (tmp / "images").mkdir()
    (tmp / "images" / "a.png").write_bytes(_png(1))
    port = _free_port()
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [
        f"serve.port={port}", "serve.num_cpus_per_replica=0.5", "serve.max_batch_size=4",
        "serve.batch_wait_timeout_s=0.05", "serve.max_request_bytes=100000", "serve.max_image_pixels=10000",
        f"serve.path_roots=[{tmp / 'images'}]", "serve.app_name=test-must"])
    try:
        info = start_app(cfg, path)
        assert info["url"] == f"http://127.0.0.1:{port}/"
        yield {"url": info["url"], "cfg": cfg, "path": path, "dir": tmp}
    finally:
        serve.shutdown()


def _post(url: str, body: bytes, content_type: str = "image/png", **params) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": content_type}, params=params, timeout=60)


def _local_labels(served, png: bytes) -> dict:
    image = np.array(Image.open(io.BytesIO(png)).convert("RGB"))[None]
    spec = TeacherSpec(default_task_names(), "checkpoint", "student", path=served["path"])
    return TeacherSet([spec], served["cfg"], CLASSES, SIZE).predict(image)


def test_every_task_predicted_as_the_labeller_would(served):
    png = _png(2)
    res = _post(served["url"], png, size="48x40")
    assert res.status_code == 200, res.text
    pred = res.json()["predictions"]
    assert set(pred) == set(default_task_names())
    local = _local_labels(served, png)
    cls = pred["classification"]
    assert [t["class_id"] for t in cls["topk"]] == local["classification"][0]["topk_ids"].tolist()
    assert cls["name"] == CLASSES[cls["class_id"]] and all(t["name"] in CLASSES for t in cls["topk"])
    det = pred["detection"]["boxes"]
    assert len(det) == len(local["detection"][0]["boxes"])
    assert all(b["name"] in CLASSES and 0 <= b["score"] <= 1 and len(b["box_px"]) == 4 for b in det)
    tasks = build_tasks(default_task_names(), len(CLASSES))
    for name in ("segmentation", "depth", "normals"):
        cells = {k: base64.b64decode(v) if k.endswith("_png") else v for k, v in pred[name].items()
                 if k not in ("size", "encoding")}
        assert tasks[name].decode(cells).shape[:2] == (48, 40)
    seg = tasks["segmentation"].decode({"seg_png": base64.b64decode(
        _post(served["url"], png, size=SIZE).json()["predictions"]["segmentation"]["seg_png"])})
    assert (seg == local["segmentation"][0]).mean() > 0.99  # float rounding of another batch size aside


def test_concurrent_requests_each_get_their_own_answer(served):
    pngs = [_png(10 + i % 4) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda b: _post(served["url"], b, tasks="classification,detection"), pngs))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    for png, answer in zip(pngs, answers):
        first = answers[pngs.index(png)].json()["predictions"]  # the same image, maybe in another batch
        pred = answer.json()["predictions"]
        assert set(pred) == {"classification", "detection"}
        assert _topk(pred) == _topk(first) and len(pred["detection"]["boxes"]) == len(first["detection"]["boxes"])
    assert len({str(_topk(a.json()["predictions"])) for a in answers}) > 1  # different images, different answers


def _topk(pred: dict) -> list:
    return [(t["class_id"], round(t["prob"], 4)) for t in pred["classification"]["topk"]]


def test_a_local_file_by_path_and_the_model_info(served):
    by_path = requests.post(served["url"], json={"path": str(served["dir"] / "images" / "a.png"), "topk": 2},
                            timeout=60)
    assert by_path.status_code == 200, by_path.text
    assert _topk(by_path.json()["predictions"]) == _topk(_post(served["url"], _png(1), topk=2).json()["predictions"])
    assert len(by_path.json()["predictions"]["classification"]["topk"]) == 2
    info = requests.get(served["url"], timeout=60).json()
    assert info["classes"] == CLASSES and info["image_size"] == SIZE


@pytest.mark.parametrize("body,content_type,params,status,message", [
    (b"hello", "image/png", {}, 400, "not a usable image"),
    (b"", "image/png", {}, 400, "empty"),
    (_png(3), "text/plain", {}, 415, "unsupported content type"),
    (b"x" * 100_001, "image/png", {}, 413, "over the limit"),
    (_png(3, side=128), "image/png", {}, 413, "too_large"),
    (_png(3), "image/png", {"topk": "many"}, 400, "topk must be"),
    (_png(3), "image/png", {"colour": "red"}, 400, "unknown option"),
    (_png(3), "image/png", {"tasks": "edges"}, 400, "unknown task"),
    (_png(3), "image/png", {"size": "9000x9000"}, 400, "over the limit"),
    (b"{not json", "application/json", {}, 400, "not valid JSON"),
    (b'{"path": "/etc/passwd"}', "application/json", {}, 403, "not an absolute path under an allowed folder"),
])
def test_bad_requests_get_a_4xx_with_a_message(served, body, content_type, params, status, message):
    res = _post(served["url"], body, content_type, **params)
    assert res.status_code == status, res.text
    assert message in res.json()["error"]


def test_missing_file_and_wrong_method(served):
    missing = requests.post(served["url"], json={"path": str(served["dir"] / "images" / "nope.png")}, timeout=60)
    assert missing.status_code == 404 and "no such file" in missing.json()["error"]
    assert requests.put(served["url"], data=b"x", timeout=60).status_code == 405


def test_replicas_and_exposure_from_the_config():
    from must_ray.config import ServeConfig
    from must_ray.serve.run import deployment_options, is_loopback

    assert deployment_options(ServeConfig(num_replicas=[2, 2]))["num_replicas"] == 2
    auto = deployment_options(ServeConfig(num_replicas=[1, 3], target_ongoing_requests=4))["autoscaling_config"]
    assert auto == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
