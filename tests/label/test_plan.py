"""The labelling driver at scale (must_ray/label/plan.py, verify.py, store.py's nested layout):
the plan written in pieces (in process and by Ray tasks), descriptors that carry no ids, the
exactly-once check as Ray tasks, the previous one-file plan converted, and a real job SIGKILLed
while its distributed plan is being written. Real Parquet and Arrow files; the session's Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from must_ray.config import load_config
from must_ray.label.inputs import list_inputs, plan_table, prepare_shard, resolve_input
from must_ray.label.plan import Plan, load_plan, write_plan
from must_ray.label.run import LabelRun, label_shard_size
from must_ray.label.store import OutputStore
from must_ray.label.verify import verify_output
from must_ray.tasks import default_task_names
from must_ray.typed_config import ConfigError
from tests.conftest import REPO
from tests.test_table_readers import assert_read_as

RANDOM = [f"label.teachers.{t}.kind=random" for t in default_task_names()]


def _cfg(root, *sets):
    return load_config(REPO / "jobs" / "configs" / "demo.yaml", [f"paths.root={root}", *RANDOM, *sets])


def _commit(store: OutputStore, plan: Plan, shards, bad=()) -> None:
    """Commit ``shards`` with their planned ids (ids in ``bad`` as quarantine rows instead)."""
    from must_ray.label.store import QUARANTINE_SCHEMA

    for s in shards:
        ids = plan.read_shard(s).column("image_id").to_pylist()
        q = pa.Table.from_pylist([{"image_id": i, "path": "", "source": "t", "reason": "truncated", "detail": "",
                                   "shard": s} for i in ids if i in bad], schema=QUARANTINE_SCHEMA)
        store.commit_shard(s, pa.table({"image_id": [i for i in ids if i not in bad]}), q)


@pytest.mark.parametrize("remote", [False, True], ids=["in_process", "ray_tasks"])
def test_world_plan_in_pieces_matches_the_one_table_plan(remote, tmp_path, request):
    if remote:
        request.getfixturevalue("ray_session")
    cfg = _cfg(tmp_path, "world.splits.unlabeled.num=50", "label.plan_piece_rows=16")
    inp = resolve_input(cfg, "world:unlabeled")
    store = OutputStore(str(tmp_path / "labels"))
    plan, ignored = write_plan(store, cfg, inp, 8, remote=remote)
    assert ignored == {} and plan.num_rows == 50 and plan.num_shards == 7 and len(plan.pieces) == 4
    assert plan.to_table().equals(plan_table(list_inputs(cfg, inp), 8))  # the same shards as before
    again = Plan.load(store)
    assert again.pieces == plan.pieces and again.rows.tolist() == [8] * 6 + [2]
    (desc,) = plan.descriptors([6])
    assert set(desc) == {"shard", "piece", "batch"}  # a slice of a piece, no ids
    prep = prepare_shard(desc, LabelRun(cfg, "world:unlabeled", str(tmp_path / "labels")).prepare_ctx)
    assert prep.image_id == plan.to_table().column("image_id").to_pylist()[48:] and prep.pixels.shape[0] == 2


def test_table_plan_is_per_file_and_refuses_duplicate_ids(ray_session, tmp_path):
    folder = tmp_path / "table"
    folder.mkdir()
    for name, ids in (("1", "abcde"), ("2", "fgh")):
        pq.write_table(pa.table({"image": pa.array([b"x"] * len(ids), pa.binary()), "image_id": list(ids)}),
                       folder / f"{name}.parquet")
    cfg = _cfg(tmp_path)
    store = OutputStore(str(tmp_path / "labels"))
    plan, _ = write_plan(store, cfg, resolve_input(cfg, str(folder)), 4, remote=True)
    assert plan.rows.tolist() == [4, 1, 3] and len(plan.pieces) == 2  # shards never span files
    pq.write_table(pa.table({"image": pa.array([b"x"], pa.binary()), "image_id": ["c"]}), folder / "3.parquet")
    store.clear_plan()
    with pytest.raises(ConfigError, match=r"image_id values are not unique \(e.g. 'c'\)"):
        write_plan(store, cfg, resolve_input(cfg, str(folder)), 4, remote=True)
    assert not Path(store.plan_dir).exists()  # nothing of a refused plan is left


def test_verify_runs_per_shard_in_ray_tasks_and_names_problems(ray_session, tmp_path):
    cfg = _cfg(tmp_path, "world.splits.unlabeled.num=30", "label.plan_piece_rows=8")
    store = OutputStore(str(tmp_path / "labels"), files_per_dir=2)
    plan, _ = write_plan(store, cfg, resolve_input(cfg, "world:unlabeled"), 4, remote=True)
    store.makedirs()
    ids = plan.to_table().column("image_id").to_pylist()
    _commit(store, plan, range(plan.num_shards), bad={ids[5], ids[29]})
    assert sorted(os.listdir(store.root)) == ["0000", "0001", "0002", "0003"]  # 8 shards, 2 per folder
    counts = verify_output(store, plan)
    assert (counts["inputs"], counts["rows"], counts["quarantined"]) == (30, 28, 2)
    assert counts["quarantine_reasons"] == {"truncated": 2}
    assert counts["exactly_once"] == {"passed": True, "shards": 8, "inputs": 30, "tasks": 4,
                                      "seconds": counts["exactly_once"]["seconds"]}
    store.write_table(store.part_path(3), pa.table({"image_id": ids[12:16] + [ids[0]]}))  # id 0 twice
    os.remove(store.part_path(6))
    with pytest.raises(RuntimeError) as err:
        verify_output(store, plan)
    message = str(err.value)
    assert f"1 ids not in the plan (e.g. {[ids[0]]})" in message
    assert f"4 planned ids missing (e.g. {ids[24:27]})" in message


def test_an_output_with_the_one_file_plan_resumes_from_pieces(tmp_path):
    """The layout before plan pieces (``<output>_manifest/plan.arrow``) is converted on open."""
    cfg = _cfg(tmp_path, "world.splits.unlabeled.num=20", "label.shard_size=6")
    run = LabelRun(cfg, "world:unlabeled", str(tmp_path / "labels"))
    table = run.open().to_table()
    run.store.write_plan(table)
    run.store.clear_plan()
    plan = LabelRun(cfg, "world:unlabeled", str(tmp_path / "labels")).open()
    assert plan.to_table().equals(table) and not Path(run.store.plan_path).exists()
    assert label_shard_size(_cfg(tmp_path, "label.shard_bytes=100000", "label.image_size=64"), ["depth"]) == 4


def test_kill_while_the_distributed_plan_is_written_then_rerun_exactly_once(ray_session, tmp_path):
    """SIGKILL a real `jobs/label.py` after its first plan piece (the driver waits between pieces,
    ``MUST_RAY_PLAN_PAUSE_S``): no plan is trusted; the rerun plans again and labels every id once,
    into part files spread over sub-directories that every documented reader reads as the table."""
    out = tmp_path / "labels"
    n = 6
    args = [sys.executable, str(REPO / "jobs" / "label.py"), "--input", "world:unlabeled", "--output", str(out),
            *[x for s in [f"paths.root={tmp_path}", f"world.splits.unlabeled.num={n}", "label.shard_size=1",
                          "label.plan_piece_rows=2", "label.files_per_dir=2", "label.batch_size=1",
                          "label.image_size=32", "label.actors=[1, 1]", "label.num_cpus_per_actor=1",
                          "label.decode_num_cpus=1", *RANDOM] for x in ("--set", s)]]
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    store = OutputStore(str(out))
    proc = subprocess.Popen(args, cwd=tmp_path, env=dict(env, MUST_RAY_PLAN_PAUSE_S="3"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(Path(store.plan_dir).glob("piece-*.arrow")):
        time.sleep(0.02)
    assert proc.poll() is None, f"job ended before the kill: {proc.communicate()[1].decode()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert list(Path(store.plan_dir).glob("piece-*.arrow")) and not Path(store.run_path).exists()
    assert not Path(store.plan_dir, "index.arrow").exists()

    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["rows"] == summary["inputs"] == n and summary["shards"] == n
    assert summary["exactly_once"]["passed"] and summary["exactly_once"]["shards"] == n
    assert sorted(os.listdir(out)) == ["0000", "0001", "0002"]
    assert all(len(os.listdir(out / d)) == 2 for d in os.listdir(out))
    expected = load_plan(store).to_table().column("image_id").to_pylist()
    assert len(expected) == len(set(expected)) == n
    assert_read_as(out, expected, ray_session, nested=True)


def _folder(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * len(name))
    return root


@pytest.mark.parametrize("link", [False, True], ids=["split_by_subfolder", "folder_link_one_task"])
def test_folder_plan_by_subfolder_tasks_is_the_one_walk_plan(link, ray_session, tmp_path):
    """A folder is listed by one task per top-level sub-folder (one task for the whole tree when
    it holds a folder link): the same inputs, order, shards and ignored counts as one walk."""
    pool = _folder(tmp_path / "pool", ["a.png", "a/x.png", "a/y/z.png", "a0.png", "b/.hidden.png", "b/c.jpg",
                                       "b/notes.txt", "c.png", "d/e/f.png", "d/e/g.png", "_skip/h.png"])
    if link:
        os.symlink(pool / "d", pool / "b" / "to_d")
    cfg = _cfg(tmp_path, "label.plan_piece_rows=3")
    for uri in (str(pool), str(pool / "*" / "*.png")):
        inp = resolve_input(cfg, uri)
        store = OutputStore(str(tmp_path / "labels"))
        store.clear_plan()
        plan, ignored = write_plan(store, cfg, inp, 2, remote=True)
        listing = list_inputs(cfg, inp)
        assert plan.to_table().equals(plan_table(listing, 2)) and ignored == listing.ignored, uri
        assert not Path(store.plan_dir, "listing").exists()
    assert [Path(i).relative_to(pool).as_posix() for i in listing.image_id] == ["a/x.png", "a/y/z.png", "d/e/f.png",
                                                                              "d/e/g.png"]  # the glob's inputs
