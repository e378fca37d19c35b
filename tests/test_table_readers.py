"""Every table must-ray writes is read as exactly that table by the common Parquet readers:
pyarrow.dataset, Ray Data, pandas, polars (the folder, ``*.parquet`` and ``**/*.parquet``) and
DuckDB (``*.parquet`` and ``**/*.parquet``). Checked on a real labelling output and its quarantine
table, a world split, an imported table and its quarantine table, during a labelling commit, and on
an output of the old layout (bookkeeping inside the folder) that a resumed run moves out."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from must_ray.config import load_config
from must_ray.datasets.exporters import EXPORT_FORMATS, export_labels
from must_ray.datasets.importers import import_dataset
from must_ray.label.plan import load_plan
from must_ray.label.run import run_labeling
from must_ray.label.store import QUARANTINE_SCHEMA, OutputStore
from must_ray.table import TableNotFoundError, non_table_files, open_table, table_files
from must_ray.tasks import default_task_names
from tests.conftest import REPO

N_SCENES = 6
RANDOM = [f"label.teachers.{t}.kind=random" for t in default_task_names()]


def reader_ids(folder: str, ray, nested: bool = False) -> dict[str, list[str]]:
    """The sorted ``image_id`` column of ``folder`` as each reader sees it (``nested``: part files
    in sub-directories, which the ``*.parquet`` globs do not reach by design)."""
    def duck(pattern: str) -> list:
        return [r[0] for r in duckdb.sql(f"SELECT image_id FROM read_parquet('{folder}/{pattern}')").fetchall()]

    got = {
        "pyarrow.dataset": pads.dataset(folder).to_table(columns=["image_id"]).column("image_id").to_pylist(),
        "ray.data": [r["image_id"] for r in ray.data.read_parquet(folder).select_columns(["image_id"]).take_all()],
        "pandas": pd.read_parquet(folder, columns=["image_id"])["image_id"].tolist(),
        "polars": pl.read_parquet(folder, columns=["image_id"])["image_id"].to_list(),
        "polars *.parquet": pl.read_parquet(f"{folder}/*.parquet", columns=["image_id"])["image_id"].to_list(),
        "polars **/*.parquet": pl.read_parquet(f"{folder}/**/*.parquet", columns=["image_id"])["image_id"].to_list(),
        "duckdb *.parquet": duck("*.parquet"),
        "duckdb **/*.parquet": duck("**/*.parquet"),
    } if not nested else {
        "pyarrow.dataset": pads.dataset(folder).to_table(columns=["image_id"]).column("image_id").to_pylist(),
        "ray.data": [r["image_id"] for r in ray.data.read_parquet(folder).select_columns(["image_id"]).take_all()],
        "pandas": pd.read_parquet(folder, columns=["image_id"])["image_id"].tolist(),
        "polars": pl.read_parquet(folder, columns=["image_id"])["image_id"].to_list(),
        "polars **/*.parquet": pl.read_parquet(f"{folder}/**/*.parquet", columns=["image_id"])["image_id"].to_list(),
        "duckdb **/*.parquet": duck("**/*.parquet"),
        "table_files": open_table(folder).to_table(columns=["image_id"]).column("image_id").to_pylist(),
    }
    return {name: sorted(ids) for name, ids in got.items()}


def assert_read_as(folder, expected_ids, ray, nested: bool = False) -> None:
    """Every reader gives exactly ``expected_ids`` (each once) from ``folder``."""
    expected = sorted(expected_ids)
    assert expected, f"{folder}: nothing to compare"
    wrong = {name: ids for name, ids in reader_ids(str(folder), ray, nested).items() if ids != expected}
    assert not wrong, f"{folder}: readers disagree with the table's {len(expected)} rows: " + \
        ", ".join(f"{n} read {len(ids)}" for n, ids in wrong.items())


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), (value, 255 - value, 40)).save(path)


@pytest.fixture(scope="module")
def world(ray_session, demo_config, tmp_path_factory):
    """A world split as a table and as PNG files, plus a labelling output of those files and one
    undecodable file (so it has a quarantine table)."""
    from must_ray.world.splits import write_split

    root = tmp_path_factory.mktemp("readers")
    write_split(demo_config, "test", str(root / "split"), num=N_SCENES, image_dir=str(root / "png"))
    (root / "png" / "broken.png").write_bytes(b"not an image at all")
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml",
                      [f"paths.root={root}", "label.actors=[1, 1]", "label.num_cpus_per_actor=1",
                       "label.decode_num_cpus=1", "label.shard_size=3", "label.batch_size=3",
                       "label.image_size=32", *RANDOM])
    summary = run_labeling(cfg, str(root / "png"), str(root / "labels"))
    return {"root": root, "cfg": cfg, "summary": summary}


def test_label_output_and_its_quarantine_read_as_the_tables(world, ray_session):
    root = world["root"]
    pngs = sorted(str(p) for p in (root / "png").iterdir())
    broken = str(root / "png" / "broken.png")
    assert world["summary"]["rows"] == N_SCENES and world["summary"]["quarantined"] == 1
    assert_read_as(root / "labels", [p for p in pngs if p != broken], ray_session)
    assert_read_as(root / "labels_quarantine", [broken], ray_session)
    assert non_table_files(str(root / "labels")) == [] and non_table_files(str(root / "labels_quarantine")) == []
    store = OutputStore(str(root / "labels"))
    assert store.read_success()["rows"] == N_SCENES and load_plan(store).num_rows == N_SCENES + 1


def test_export_all_formats_of_a_label_output(world, ray_session, tmp_path):
    """The documented `export_labels --table out/demo/labels --format all` (the plan file was once
    taken for the table: "nothing to export")."""
    summary = export_labels(str(world["root"] / "labels"), str(tmp_path / "export"), ["all"])
    assert sorted(summary["formats"]) == sorted(EXPORT_FORMATS) and summary["images_exported"] == N_SCENES


def test_export_job_answers_a_missing_table_with_exit_2(tmp_path):
    missing = tmp_path / "no_such_table"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "export_labels.py"), "--table", str(missing),
                           "--format", "all", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and f"--table {missing}: no such file or folder" in proc.stderr


def test_world_split_reads_as_the_table(world, ray_session):
    split = world["root"] / "split"
    ids = open_table(str(split)).to_table(columns=["image_id"]).column("image_id").to_pylist()
    assert len(set(ids)) == N_SCENES
    assert_read_as(split, ids, ray_session)


def test_imported_table_and_its_quarantine_read_as_the_tables(ray_session, tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        _png(images / "cat" / f"{i}.png", 40 * i)
        _png(images / "dog" / f"{i}.png", 40 * i + 20)
    (images / "dog" / "bad.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "imported"
    summary = import_dataset("imagefolder", str(out), images=str(images), rows_per_file=2)
    assert summary["rows"] == 6 and summary["quarantined"] == 1
    assert len(table_files(str(out))[1]) == 3  # several part files, so the globs are exercised
    ids = open_table(str(out)).to_table(columns=["image_id"]).column("image_id").to_pylist()
    assert_read_as(out, ids, ray_session)
    quarantined = pq.read_table(f"{out}_quarantine").column("image_id").to_pylist()
    assert_read_as(f"{out}_quarantine", quarantined, ray_session)
    assert not os.path.exists(f"{out}_tmp")  # the importer's work folder is gone


def _rows(ids: list[str], shard: int) -> tuple[pa.Table, pa.Table]:
    table = pa.table({"image_id": ids, "shard": [shard] * len(ids)})
    return table, QUARANTINE_SCHEMA.empty_table()


def test_a_commit_in_progress_is_invisible_to_every_reader(ray_session, tmp_path):
    """While a part file is being written (its temp file exists), the readers see the committed
    shards only, and no temp file is ever inside the table or quarantine folder."""
    store = OutputStore(str(tmp_path / "labels"))
    store.makedirs()
    store.commit_shard(0, *_rows(["a", "b"], 0))
    seen = {}

    def write_slowly(f):
        pq.write_table(pa.table({"image_id": ["c"], "shard": [1]}), f)
        f.flush()
        seen["tmp"] = sorted(os.listdir(store.tmp_dir))
        seen["readers"] = reader_ids(store.root, ray_session)

    store._write_bytes_atomic(store.path(store.part_name(1)), write_slowly)
    assert len(seen["tmp"]) == 1 and seen["tmp"][0].endswith(".tmp")
    assert all(ids == ["a", "b"] for ids in seen["readers"].values()), seen["readers"]
    assert_read_as(store.root, ["a", "b", "c"], ray_session)


def test_an_output_of_the_old_layout_resumes_and_becomes_a_clean_table(world, ray_session, tmp_path):
    """Labelling output written by an older must-ray (plan, run.json, _SUCCESS.json and _tmp/
    inside the table folder): resuming it with the same settings moves the bookkeeping out and
    relabels nothing."""
    old = tmp_path / "labels"
    shutil.copytree(world["root"] / "labels", old)
    shutil.copytree(world["root"] / "labels_quarantine", tmp_path / "labels_quarantine")
    store = OutputStore(str(old))
    new_manifest = world["root"] / "labels_manifest"
    (old / "_manifest" / "_tmp").mkdir(parents=True)
    (old / "_tmp").mkdir()
    (old / "_tmp" / "part-000009.parquet.dead.tmp").write_bytes(b"half")
    (tmp_path / "labels_quarantine" / "_tmp").mkdir()
    # the oldest layout; resuming moves it to <output>_manifest/plan.arrow, then to plan pieces
    pq.write_table(load_plan(OutputStore(str(world["root"] / "labels"))).to_table(), old / "_manifest" / "plan.parquet")
    shutil.copy(new_manifest / "run.json", old / "_manifest" / "run.json")
    shutil.copy(new_manifest / "SUCCESS.json", old / "_SUCCESS.json")
    with pytest.raises(Exception):
        pl.read_parquet(str(old))  # why the layout changed
    parts = {p.name: p.stat().st_mtime_ns for p in old.glob("part-*.parquet")}

    summary = run_labeling(world["cfg"], str(world["root"] / "png"), str(old))
    assert summary["shards_skipped"] == len(parts) and summary["shards_labeled"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in old.glob("part-*.parquet")} == parts
    assert sorted(os.listdir(old)) == sorted(parts)
    assert sorted(os.listdir(tmp_path / "labels_quarantine")) == ["quarantine-000000.parquet"]
    assert json.loads(Path(store.success_path).read_text())["rows"] == N_SCENES
    assert_read_as(old, open_table(str(old)).to_table(columns=["image_id"]).column("image_id").to_pylist(),
                   ray_session)


def test_table_files_rule_and_missing_table(tmp_path):
    folder = tmp_path / "t"
    (folder / "sub").mkdir(parents=True)
    (folder / "_hidden").mkdir()
    for rel in ("a.parquet", "sub/b.parquet", "_hidden/c.parquet", ".d.parquet", "_e.parquet"):
        pq.write_table(pa.table({"image_id": [rel]}), folder / rel)
    (folder / "notes.txt").write_text("x")
    _, files = table_files(str(folder))
    assert [os.path.relpath(f, folder) for f in files] == ["a.parquet", "sub/b.parquet"]
    assert [os.path.relpath(f, folder) for f in non_table_files(str(folder))] == \
        [".d.parquet", "_e.parquet", "_hidden/c.parquet", "notes.txt"]
    with pytest.raises(TableNotFoundError, match="no such table"):
        table_files(str(tmp_path / "missing"))
    assert non_table_files(str(tmp_path / "missing")) == []
