"""Pseudo-labelling with Ray Data (must_ray/label/, jobs/label.py): real Ray Data on the
session's local Ray, real image files, real Parquet; the kill test SIGKILLs a real job."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from benchmarks.label_profile import LabelProfile
from must_ray.config import load_config
from must_ray.images import decode_image, decode_image_rgb, resize_rgb
from must_ray.label.inputs import list_inputs, plan_table, prepare_shard, resolve_input, shard_descriptors
from must_ray.label.run import LabelRun, run_labeling
from must_ray.label.store import OutputStore
from must_ray.models import MultiTaskModel, file_sha256, images_to_tensor, load_model, save_model
from must_ray.models.precision import autocast, resolve_precision, to_float32
from must_ray.table import read_provenance, validate_table
from must_ray.tasks import build_tasks, default_task_names
from must_ray.typed_config import ConfigError
from must_ray.world import CATEGORIES
from tests.conftest import REPO

TASKS = list(default_task_names())
RANDOM = [f"label.teachers.{t}.kind=random" for t in TASKS]
N_IMAGES = 24


def _cfg(root, *sets):
    return load_config(REPO / "jobs" / "configs" / "demo.yaml",
                       [f"paths.root={root}", "label.actors=[1, 1]", "label.num_cpus_per_actor=1",
                        "label.decode_num_cpus=1", *sets])


@pytest.fixture(scope="module")
def world_files(ray_session, demo_config, tmp_path_factory):
    """The unlabeled world split (24 scenes) written by write_split as a table AND as PNG files."""
    from must_ray.world.splits import write_split

    root = tmp_path_factory.mktemp("world")
    write_split(demo_config, "unlabeled", str(root / "table"), num=N_IMAGES, image_dir=str(root / "png"))
    return root


def _save_teacher(path, tasks, seed):
    torch.manual_seed(seed)
    model = MultiTaskModel("test_resnet", build_tasks(tasks, len(CATEGORIES)), fpn_channels=16).eval()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return save_model(str(path), model, num_classes=len(CATEGORIES), task_cfgs={}, classes=list(CATEGORIES),
                      fpn_channels=16)


def test_label_image_files_one_row_each_and_labels_equal_the_model_outside_ray(world_files, tmp_path):
    # classification + detection share one two-task checkpoint (one forward); the others sit at the
    # default trained-teacher path <paths.root>/teachers/<task>/model.pt
    shared = _save_teacher(tmp_path / "shared.pt", ["classification", "detection"], seed=1)
    for i, task in enumerate(["segmentation", "depth", "normals"]):
        _save_teacher(tmp_path / "teachers" / task / "model.pt", [task], seed=10 + i)
    cfg = _cfg(tmp_path, f"label.teachers.classification.path={shared}", f"label.teachers.detection.path={shared}",
               "label.shard_size=8", "label.batch_size=4", "tasks.detection.score_threshold=0.05",
               "label.teachers.classification.input_size=null")  # the files' 64 px, not the demo's 32
    png_dir = world_files / "png"
    profile = LabelProfile()
    summary = run_labeling(cfg, str(png_dir), str(tmp_path / "labels"), observer=profile)

    files = sorted(str(p) for p in png_dir.iterdir())
    assert summary["rows"] == summary["inputs"] == N_IMAGES and summary["quarantined"] == 0
    assert profile.figures()["shards_decoded_in_actor"] == 0  # decode ran in its own tasks (not fused into the actor)
    table = pq.read_table(tmp_path / "labels")
    assert validate_table(table) == TASKS and table.num_rows == N_IMAGES
    ids = table.column("image_id").to_pylist()
    assert ids == files  # one row per image, id = path, in plan (sorted path) order
    for task in TASKS:
        assert table.column(task_presence(task)).null_count == 0
    prov = read_provenance(str(tmp_path / "labels"))
    assert prov["kind"] == "pseudo_labels" and prov["classes"] == list(CATEGORIES) and prov["tasks"] == TASKS
    hashes = {t: s["sha256"] for s in prov["teachers"] for t in s["tasks"]}
    assert hashes["classification"] == hashes["detection"] == file_sha256(shared)
    assert hashes["depth"] == file_sha256(str(tmp_path / "teachers" / "depth" / "model.pt"))
    assert prov["thresholds"]["detection"]["score_threshold"] == 0.05

    # the same models outside Ray, on the same decoded images, in the same batches, at the precision
    # label.precision resolves to on this CPU (bf16 autocast where it has native bf16 units)
    precision = resolve_precision(cfg.label.precision, "cpu")
    rows = table.to_pylist()
    models = {}
    for task in TASKS:
        path = shared if task in ("classification", "detection") else str(tmp_path / "teachers" / task / "model.pt")
        model, info = load_model(path, task_overrides={task: cfg.tasks[task]})
        models[task] = (model.to(memory_format=torch.channels_last), info)  # as the teacher runs it
    for start in range(0, N_IMAGES, 4):  # shards of 8 = two batches of 4, both in path order
        batch = np.stack([resize_rgb(decode_image(Path(f).read_bytes()), 64) for f in files[start:start + 4]])
        assert all(np.array_equal(decode_image_rgb(rows[start + j]["image"]), batch[j]) for j in range(4))
        with torch.no_grad():
            for task, (model, info) in models.items():
                x = images_to_tensor(batch, channels_last=True)
                with autocast(precision, "cpu"):
                    raw = to_float32(model(x, tasks=[task])[task])
                labels = info["tasks"][task].predict(raw, (64, 64))
                for j, label in enumerate(labels):
                    cells = info["tasks"][task].encode(label)
                    for col, value in cells.items():
                        assert rows[start + j][col] == value, (task, col, files[start + j])


def task_presence(task):
    from must_ray.tasks import get_task_class

    return get_task_class(task).presence_column()


def _write_bad_folder(folder: Path, good_pngs: list[Path]) -> dict[str, str]:
    """Good images in many modes + corrupt ones; returns {file name: expected reason ('' = good)}."""
    folder.mkdir()
    expect = {}
    rgb = decode_image(good_pngs[0].read_bytes())
    for i, src in enumerate(good_pngs[:3]):
        (folder / f"good_{i}.png").write_bytes(src.read_bytes())
        expect[f"good_{i}.png"] = ""
    img = Image.fromarray(rgb)
    variants = {"grey.png": img.convert("L"), "palette.png": img.convert("P"), "rgba.png": img.convert("RGBA"),
                "cmyk.jpg": img.convert("CMYK"), "big.webp": img.resize((96, 80)), "g16.tif": None}
    for name, im in variants.items():
        if im is None:
            im = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
        buf = io.BytesIO()
        im.save(buf, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "tif": "TIFF"}[name.rsplit(".", 1)[1]])
        (folder / name).write_bytes(buf.getvalue())
        expect[name] = ""
    data = good_pngs[1].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    expect["truncated.png"] = "truncated"
    (folder / "zero.jpg").write_bytes(b"")
    expect["zero.jpg"] = "empty"
    (folder / "notes.jpg").write_bytes(b"this is not an image\n" * 10)
    expect["notes.jpg"] = "not_an_image"
    # decompression bomb: a valid PNG header claiming 60000 x 60000 pixels (3.6 G), a few bytes long
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))
    (folder / "bomb.png").write_bytes(bomb)
    expect["bomb.png"] = "too_large"
    (folder / "sub").mkdir()
    (folder / "sub" / "nested.png").write_bytes(good_pngs[2].read_bytes())
    expect["sub/nested.png"] = ""
    (folder / "readme.txt").write_text("not an input: extension not in label.extensions")
    (folder / ".hidden.png").write_bytes(b"hidden files are not inputs")
    return expect


def test_bad_inputs_are_quarantined_with_reasons_and_counts_balance(world_files, tmp_path):
    """Also runs the off-the-shelf adapters (timm, torchvision detector + segmenter, random init
    weights files) inside the actors: the table they write passes the schema."""
    import timm
    import torchvision

    folder = tmp_path / "pool"
    expect = _write_bad_folder(folder, sorted((world_files / "png").iterdir()))
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", num_classes=5).state_dict(), tmp_path / "cls.pth")
    torch.save(torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None,
                                            num_classes=6).state_dict(), tmp_path / "seg.pth")
    torch.save(torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                            weights_backbone=None, num_classes=6).state_dict(), tmp_path / "det.pth")
    cfg = _cfg(tmp_path, *RANDOM, "label.shard_size=5",
               "label.teachers.classification.kind=timm", "label.teachers.classification.model_name=test_efficientnet",
               f"label.teachers.classification.path={tmp_path / 'cls.pth'}",
               "label.teachers.segmentation.kind=torchvision_segmenter",
               "label.teachers.segmentation.model_name=lraspp_mobilenet_v3_large",
               f"label.teachers.segmentation.path={tmp_path / 'seg.pth'}",
               "label.teachers.detection.kind=torchvision_detector",
               "label.teachers.detection.model_name=fasterrcnn_mobilenet_v3_large_320_fpn",
               f"label.teachers.detection.path={tmp_path / 'det.pth'}", "tasks.detection.score_threshold=0.0")
    out = tmp_path / "labels"
    summary = run_labeling(cfg, str(folder), str(out))

    good = {str(folder / k) for k, r in expect.items() if not r}
    bad = {str(folder / k): r for k, r in expect.items() if r}
    assert summary["inputs"] == len(expect)
    assert summary["ignored"] == {"hidden": 1, "not_an_image_suffix": 1}  # .hidden.png, readme.txt
    assert summary["rows"] == len(good) and summary["quarantined"] == len(bad)
    assert summary["rows"] + summary["quarantined"] == summary["inputs"]
    table = pq.read_table(out)
    assert validate_table(table) == TASKS
    assert set(table.column("image_id").to_pylist()) == good
    sizes = dict(zip(table.column("image_id").to_pylist(), zip(table.column("height").to_pylist(),
                                                                table.column("width").to_pylist())))
    assert sizes[str(folder / "big.webp")] == (80, 96)  # original size kept; image + labels at 64x64
    assert all(decode_image_rgb(b).shape == (64, 64, 3) for b in table.column("image").to_pylist())
    quarantine = pq.read_table(tmp_path / "labels_quarantine")
    assert summary["quarantine"] == str(tmp_path / "labels_quarantine")
    got = dict(zip(quarantine.column("image_id").to_pylist(), quarantine.column("reason").to_pylist()))
    assert got == bad
    assert all(quarantine.column("path").to_pylist()) and all(quarantine.column("detail").to_pylist())
    assert summary["quarantine_reasons"] == {"empty": 1, "not_an_image": 1, "too_large": 1, "truncated": 1}
    assert json.loads(Path(OutputStore(str(out)).success_path).read_text())["rows"] == len(good)


def test_kill_mid_run_then_rerun_gives_exactly_one_row_per_image(world_files, tmp_path, ray_session):
    """SIGKILL a real `jobs/label.py` after some shards committed; the rerun (the same command)
    skips the committed shards and ends with exactly one row per input id."""
    out = tmp_path / "labels"
    png_dir = world_files / "png"
    args = [sys.executable, str(REPO / "jobs" / "label.py"), "--input", str(png_dir), "--output", str(out),
            "--set", f"paths.root={tmp_path}", "--set", "label.shard_size=2", "--set", "label.batch_size=2",
            "--set", "label.image_size=96", *[x for s in RANDOM for x in ("--set", s)]]
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    total = N_IMAGES // 2
    deadline = time.time() + 180
    parts = []
    while time.time() < deadline and proc.poll() is None:
        parts = sorted(out.glob("part-*.parquet")) if out.exists() else []
        if len(parts) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"job ended before the kill: {proc.communicate()[1].decode()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    at_kill = len(list(out.glob("part-*.parquet")))
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= at_kill < total, f"kill was not mid-run: {at_kill} of {total} shards committed"
    time.sleep(2)  # let the killed job's actor die (Ray tears down a dead driver's actors)
    committed = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert not Path(OutputStore(str(out)).success_path).exists()

    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] >= len(committed) and summary["shards"] == total
    assert summary["shards_skipped"] + summary["shards_labeled"] == total
    for name, stat in committed.items():  # finished work was not redone
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stat, f"{name} was rewritten"
    ids = pq.read_table(out, columns=["image_id"]).column("image_id").to_pylist()
    expected = sorted(str(p) for p in png_dir.iterdir())
    assert len(ids) == len(set(ids)) == N_IMAGES  # no duplicates
    assert set(ids) == set(expected)  # none missing
    assert summary["rows"] == N_IMAGES and summary["quarantined"] == 0
    assert not list(Path(OutputStore(str(out)).tmp_dir).iterdir())
    print(f"kill test: {at_kill}/{total} shards committed when killed ({len(committed)} before the rerun); "
          f"the rerun skipped "
          f"{summary['shards_skipped']} and labelled {summary['shards_labeled']}; {len(ids)} rows, unique")


def test_table_input_uses_its_image_ids(world_files, tmp_path):
    cfg = _cfg(tmp_path, *RANDOM, "label.tasks=[depth, segmentation]", "label.shard_size=16")
    summary = run_labeling(cfg, str(world_files / "table"), str(tmp_path / "labels"))
    src = pq.read_table(world_files / "table", columns=["image_id", "image"])
    out = pq.read_table(tmp_path / "labels")
    assert validate_table(out) == ["segmentation", "depth"] and summary["shards"] == 2
    assert out.column("image_id").to_pylist() == src.column("image_id").to_pylist()
    assert out.column("image").to_pylist() == src.column("image").to_pylist()  # 64x64 RGB PNGs kept as they are
    assert read_provenance(str(tmp_path / "labels"))["input"]["kind"] == "table"


def test_world_split_on_the_fly_matches_its_files(world_files, tmp_path, demo_config):
    """Rendering world:unlabeled in the decode step gives the same pixels and ids as the table
    make_world wrote (no Ray needed: the decode step is a plain function)."""
    cfg = _cfg(tmp_path, *RANDOM, f"world.splits.unlabeled.num={N_IMAGES}")
    inp = resolve_input(cfg, None)  # no --input and no world table under paths.root: render on the fly
    assert inp.kind == "world" and inp.uri == "world:unlabeled"
    listing = list_inputs(cfg, inp)
    plan = plan_table(listing, 10)
    assert plan.column("shard").to_pylist() == [0] * 10 + [1] * 10 + [2] * 4
    from must_ray.label.inputs import make_prepare_context

    prep = prepare_shard(shard_descriptors(plan, [2])[0], make_prepare_context(cfg, inp, 64))
    src = pq.read_table(world_files / "table").slice(20, 4)
    assert prep.image_id == src.column("image_id").to_pylist()
    for j, png in enumerate(src.column("image").to_pylist()):
        assert np.array_equal(prep.pixels[j], decode_image_rgb(png))


def test_resume_refuses_other_settings_and_missing_teacher_fails_fast(world_files, tmp_path):
    cfg = _cfg(tmp_path, *RANDOM, "label.shard_size=8")
    run = LabelRun(cfg, str(world_files / "png"), str(tmp_path / "labels"))
    run.open()
    assert LabelRun(cfg, str(world_files / "png"), str(tmp_path / "labels")).open().num_rows == N_IMAGES
    other = _cfg(tmp_path, *RANDOM, "label.shard_size=8", "tasks.segmentation.confidence_threshold=0.5")
    with pytest.raises(ConfigError, match=r"differs: .*thresholds"):
        LabelRun(other, str(world_files / "png"), str(tmp_path / "labels")).open()
    # the job: a missing teacher fails before Ray starts, naming the task and the path (exit code 2)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "label.py"), "--input", str(world_files / "png"),
                           "--set", f"paths.root={tmp_path / 'empty'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "label.teachers.classification" in proc.stderr and "model.pt" in proc.stderr
    assert "kind=random" in proc.stderr


def test_teacher_actor_crash_mid_run_is_retried_exactly_once(world_files, tmp_path, ray_session):
    """SIGKILL the teacher actor's process (a worker of this test's own Ray) after it committed a
    shard: Ray Data restarts the actor and retries its shard; the table still has one row per image."""
    import threading

    import psutil

    out = tmp_path / "labels"
    cfg = _cfg(tmp_path, *RANDOM, "label.shard_size=2", "label.batch_size=2", "label.image_size=96")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_labeling(cfg, str(world_files / "png"), str(out))))
    thread.start()
    victim = None
    deadline = time.time() + 120
    while time.time() < deadline and thread.is_alive() and victim is None:
        if out.exists() and len(list(out.glob("part-*.parquet"))) >= 1:
            for p in psutil.Process().children(recursive=True):  # only our own Ray's workers
                try:
                    if "ShardLabeler" in " ".join(p.cmdline()):
                        victim = p
                        break
                except psutil.Error:
                    continue
        time.sleep(0.02)
    assert victim is not None, "no teacher actor found mid-run"
    done_before = len(list(out.glob("part-*.parquet")))
    victim.kill()
    thread.join(timeout=240)
    assert not thread.is_alive() and result, "labelling did not finish after the actor crash"
    assert done_before < N_IMAGES // 2, "the actor was killed after the last shard"
    assert not victim.is_running()  # the labelling was finished by a restarted actor process
    ids = pq.read_table(out, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert result["rows"] == N_IMAGES and result["quarantined"] == 0
    assert result["shards_retried"] in (0, 1)  # at most the shard the killed actor had in flight


def test_listing_globs_uris_and_ids(world_files, tmp_path):
    """Folder, glob and file:// URI inputs list the same way (metadata only); ids are paths."""
    png = world_files / "png"
    cfg = _cfg(tmp_path, *RANDOM)
    every = list_inputs(cfg, resolve_input(cfg, str(png)))
    assert every.image_id == sorted(str(p) for p in png.iterdir()) and every.ignored == {}
    assert all(size > 0 for size in every.offset)
    glob = list_inputs(cfg, resolve_input(cfg, str(png / "*_00010001[0-3].png")))
    assert [Path(i).name for i in glob.image_id] == [f"world_default_s0_0001000{k}.png" for k in range(10, 14)]
    uri = list_inputs(cfg, resolve_input(cfg, f"file://{png}"))
    assert uri.image_id == every.image_id
    single = resolve_input(cfg, every.image_id[0])
    assert single.kind == "files" and list_inputs(cfg, single).image_id == every.image_id[:1]
    assert resolve_input(cfg, str(world_files / "table")).kind == "table"
    with pytest.raises(ConfigError, match="no such file"):
        resolve_input(cfg, str(tmp_path / "nope"))


def test_benchmark_label_smoke(ray_session, demo_config, tmp_path):
    """jobs/benchmark.py label's function: all three contestants (the job, the plain loop, the
    plain Ray Data idiom) label the same images into the same columns; ratios reported."""
    from benchmarks.label import LabelOptions, benchmark_label

    cfg = _cfg(tmp_path, "label.shard_size=8")  # no teacher files under paths.root: random teachers
    result = benchmark_label(cfg, LabelOptions(num_images=16, workdir=str(tmp_path / "bench"), threads=[1], repeats=1))
    assert result["teachers"] == {t: "random" for t in TASKS}
    assert result["plain"]["1"][0]["rows"] == result["ray"][0]["rows"] == 16
    assert result["ratio"] > 0 and result["steady_ratio"] > 0 and result["ray"][0]["shards_decoded_in_actor"] == 0
    (idiom,) = result["idiom"]
    assert idiom["rows"] == 16 and result["ratio_vs_idiom"] > 0
    idiom_table = pq.read_table(tmp_path / "bench" / "idiom_labels")
    ours = pq.read_table(tmp_path / "bench" / "ray_labels")
    assert set(idiom_table.column_names) == set(ours.column_names)
    json.dumps(result)
