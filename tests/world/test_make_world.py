"""jobs/make_world.py end to end: Ray Data writes a split; bytes are identical across runs."""
import copy
import hashlib
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from must_ray.images import decode_image_rgb
from must_ray.table import decode_labels, read_provenance, validate_table
from must_ray.tasks import default_task_names, get_task_class
from must_ray.typed_config import ConfigError
from must_ray.world.labels import render_labelled
from must_ray.world.splits import check_split_output, image_file_name, image_id_for, write_split
from tests.conftest import REPO


def _digest(directory):
    files = sorted(p for p in directory.iterdir() if p.suffix == ".parquet")
    return [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]


def test_make_world_job_writes_identical_test_split_twice(ray_session, demo_config, tmp_path):
    """The job (its own Ray) and the library call (the session's Ray) write the same bytes."""
    outs = [tmp_path / "job", tmp_path / "library"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "make_world.py"), "--split", "test", "--num", "64", "--out", str(outs[0]),
         "--set", "ray.num_cpus=2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 64 and summary["splits"][0]["path"] == str(outs[0])
    write_split(demo_config, "test", str(outs[1]), num=64)
    assert _digest(outs[0]) == _digest(outs[1]) and _digest(outs[0])

    table = pq.read_table(outs[0])
    assert table.num_rows == 64
    assert validate_table(table) == list(default_task_names())
    for task in default_task_names():
        assert table.column(get_task_class(task).presence_column()).null_count == 0, task
    assert len(set(table.column("image_id").to_pylist())) == 64
    prov = read_provenance(str(outs[0]))
    assert prov["kind"] == "world" and prov["split"] == "test" and len(prov["classes"]) >= 3


def test_write_split_matches_renderer(ray_session, demo_config, tmp_path):
    """Rows written through Ray Data decode to exactly what the renderer and the task produced."""
    image_dir = tmp_path / "png"
    summary = write_split(demo_config, "teacher_segmentation", str(tmp_path / "seg"), num=10, image_dir=str(image_dir))
    assert summary["rows"] == 10
    table = pq.read_table(tmp_path / "seg")
    assert validate_table(table) == ["segmentation"]
    split = demo_config.world.splits["teacher_segmentation"]
    scenes = render_labelled(demo_config.world.seed, [split.seed_offset + i for i in range(10)], ["segmentation"],
                             image_size=demo_config.world.image_size, domain=split.domain,
                             min_objects=demo_config.world.min_objects, max_objects=demo_config.world.max_objects)
    for row, scene in zip(table.to_pylist(), scenes):
        assert np.array_equal(decode_image_rgb(row["image"]), scene["image"])
        labels = decode_labels(row, default_task_names())
        assert np.array_equal(labels["segmentation"], scene["segmentation"])
        assert labels["depth"] is None and labels["classification"] is None
        assert (image_dir / image_file_name(row["image_id"])).read_bytes() == row["image"]


def test_make_world_refuses_an_out_under_a_file_before_ray_starts(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "make_world.py"), "--split", "test", "--num", "2",
                           "--out", str(blocker / "test")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and f"--out {blocker / 'test'}" in proc.stderr


def test_a_split_output_that_is_a_file_or_holds_other_files_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="an existing file, not a folder"):
        check_split_output(str(tmp_path / "file"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="notes.txt.*would delete them"):
        check_split_output(str(tmp_path / "mine"))
    check_split_output(str(tmp_path / "new"))


def test_each_split_file_holds_its_own_scene_range_in_order_and_a_rewrite_leaves_no_stale_file(
        ray_session, demo_config, tmp_path):
    """File k holds scenes [k * rows_per_file, ...) in order, whatever order the actors finish in
    (several files, several render batches per file); a smaller rewrite removes the extra file."""
    cfg = copy.deepcopy(demo_config)
    cfg.world.rows_per_file, cfg.world.render_batch = 4, 3
    out = tmp_path / "split"
    write_split(cfg, "test", str(out), num=10)
    offset = cfg.world.splits["test"].seed_offset
    files = sorted(p.name for p in out.iterdir())
    assert files == ["test-00000.parquet", "test-00001.parquet", "test-00002.parquet"]
    for k, name in enumerate(files):
        ids = pq.read_table(out / name).column("image_id").to_pylist()
        expected = range(offset + 4 * k, offset + min(4 * k + 4, 10))
        assert ids == [image_id_for(cfg.world.seed, cfg.world.splits["test"].domain, i) for i in expected]
    write_split(cfg, "test", str(out), num=5)
    assert sorted(p.name for p in out.iterdir()) == files[:2]
    assert pq.read_table(out).num_rows == 5
