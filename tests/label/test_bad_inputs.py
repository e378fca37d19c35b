"""Bad labelling inputs (issue: every input becomes a row, a quarantine row with a reason, or a
one-line error before Ray starts): a generated folder of malformed entries (FIFO, socket, device
link, broken links, link loops, a folder loop, hidden and foreign files), special files and
globs as ``--input``, bad outputs, malformed Parquet tables, GIFs, and stable quarantine details.
Everything but one small labelling run and one job start is plain function calls on real files."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from must_ray.config import load_config
from must_ray.images import BadImageError, decode_image, encode_png
from must_ray.label.inputs import (
    list_inputs,
    make_prepare_context,
    plan_table,
    prepare_shard,
    resolve_input,
    shard_descriptors,
)
from must_ray.label.labeler import quarantine_rows
from must_ray.label.paths import IGNORED_KINDS, check_output_dir
from must_ray.label.run import LabelRun, check_label_paths, run_labeling
from must_ray.tasks import default_task_names
from must_ray.typed_config import ConfigError
from tests.conftest import REPO

RANDOM = [f"label.teachers.{t}.kind=random" for t in default_task_names()]


def _cfg(root, *sets):
    return load_config(REPO / "jobs" / "configs" / "demo.yaml",
                       [f"paths.root={root}", "label.actors=[1, 1]", "label.num_cpus_per_actor=1",
                        "label.decode_num_cpus=1", *RANDOM, *sets])


@pytest.fixture(autouse=True)
def no_hang():
    """Opening a FIFO for reading blocks forever: fail such a test instead of hanging the suite."""
    def fail(signum, frame):
        raise TimeoutError("blocked for 300 s: was a FIFO opened?")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _png(seed: int, size: int = 40) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _gif(frames: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    return buf.getvalue()


def _socket_at(path: Path) -> None:
    """A Unix socket file at ``path`` (bound under a short temp path: socket paths are short)."""
    short = Path(tempfile.mkdtemp(prefix="s", dir="/tmp")) / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(short))
    os.rename(short, path)
    short.parent.rmdir()


def write_malformed_folder(folder: Path) -> dict[str, str]:
    """A folder of every kind of entry a user's pool held; returns {path below folder: what it
    must become}: ``input`` (a row or a quarantine row) or the ignored kind it is counted as."""
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(_png(0))
    (folder / "sub" / "nested.png").write_bytes(_png(1))
    red, blue = np.zeros((24, 24, 3), np.uint8), np.zeros((24, 24, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    (folder / "anim.gif").write_bytes(_gif([red, blue]))
    (folder / "corrupt.png").write_bytes(b"this is not an image\n" * 8)
    os.symlink("good.png", folder / "alias.png")  # a link to a file is an input of its own
    for name in ("readme.txt", "notes.md", "labels.csv"):
        (folder / name).write_text("not an image")
    (folder / ".hidden.png").write_bytes(_png(2))
    (folder / "_private").mkdir()
    (folder / "_private" / "x.png").write_bytes(_png(3))
    os.mkfifo(folder / "pipe.png")
    _socket_at(folder / "sock.png")
    os.symlink("/dev/null", folder / "null.png")
    os.symlink("missing.png", folder / "gone.png")
    os.symlink(str(folder / "nowhere" / "x.jpg"), folder / "gone2.jpg")
    os.symlink("self.png", folder / "self.png")
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    os.symlink("..", folder / "sub" / "up")  # a folder loop: the root again
    os.symlink("sub", folder / "sub_link")  # a second way into a folder already listed
    return {"good.png": "input", "sub/nested.png": "input", "anim.gif": "input", "corrupt.png": "input",
            "alias.png": "input", "readme.txt": "not_an_image_suffix", "notes.md": "not_an_image_suffix",
            "labels.csv": "not_an_image_suffix", ".hidden.png": "hidden", "_private": "hidden", "pipe.png": "fifo",
            "sock.png": "socket", "null.png": "device", "gone.png": "broken_symlink", "gone2.jpg": "broken_symlink",
            "self.png": "symlink_loop", "a.png": "symlink_loop", "b.png": "symlink_loop",
            "sub/up": "duplicate_directory", "sub_link": "duplicate_directory"}


def _expected_ignored(expect: dict[str, str]) -> dict[str, int]:
    kinds = [k for k in expect.values() if k != "input"]
    return {k: kinds.count(k) for k in sorted(set(kinds))}


def test_every_entry_of_a_malformed_folder_is_an_input_or_counted_by_kind(tmp_path):
    folder = tmp_path / "pool"
    expect = write_malformed_folder(folder)
    cfg = _cfg(tmp_path)
    listing = list_inputs(cfg, resolve_input(cfg, str(folder)))
    assert listing.image_id == sorted(str(folder / k) for k, v in expect.items() if v == "input")
    assert listing.ignored == _expected_ignored(expect)
    assert set(listing.ignored) <= set(IGNORED_KINDS)
    assert len(listing.image_id) + sum(listing.ignored.values()) == len(expect)
    sizes = dict(zip(listing.image_id, listing.offset))
    assert sizes[str(folder / "alias.png")] == (folder / "good.png").stat().st_size


def test_a_folder_loop_lists_each_real_folder_once_and_prefers_real_paths(tmp_path):
    """`sub/up -> ..` used to turn one image into 41 inputs."""
    (tmp_path / "pool" / "sub").mkdir(parents=True)
    (tmp_path / "pool" / "sub" / "one.png").write_bytes(_png(0))
    os.symlink("..", tmp_path / "pool" / "sub" / "up")
    os.symlink("sub", tmp_path / "pool" / "a_link")  # sorts before the real folder
    cfg = _cfg(tmp_path)
    listing = list_inputs(cfg, resolve_input(cfg, str(tmp_path / "pool")))
    assert listing.image_id == [str(tmp_path / "pool" / "sub" / "one.png")]
    assert listing.ignored == {"duplicate_directory": 2}


def test_special_files_and_broken_links_as_input_are_one_line_errors(tmp_path):
    cfg = _cfg(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    _socket_at(tmp_path / "sock")
    os.symlink("/dev/null", tmp_path / "null.png")
    os.symlink("missing", tmp_path / "gone")
    os.symlink("loop", tmp_path / "loop")
    cases = {"pipe": "FIFO", "sock": "socket", "null.png": "device", "gone": "broken symbolic link",
             "loop": "symbolic link loop"}
    for name, words in cases.items():
        with pytest.raises(ConfigError, match=words) as err:
            resolve_input(cfg, str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="device"):
        resolve_input(cfg, "/dev/null")


def test_an_existing_path_with_glob_characters_is_a_path_not_a_glob(tmp_path):
    folder = tmp_path / "imgs[2024]"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(0))
    (folder / "b?.png").write_bytes(_png(1))
    cfg = _cfg(tmp_path)
    inp = resolve_input(cfg, str(folder))
    assert inp.kind == "files" and inp.pattern is None
    assert list_inputs(cfg, inp).image_id == [str(folder / "a.png"), str(folder / "b?.png")]
    single = resolve_input(cfg, str(folder / "b?.png"))
    assert single.pattern is None and list_inputs(cfg, single).image_id == [str(folder / "b?.png")]
    glob = resolve_input(cfg, str(tmp_path / "imgs[[]2024]" / "*.png"))  # a glob inside it: escape the '['
    assert glob.pattern is not None and len(list_inputs(cfg, glob).image_id) == 2


def test_bad_outputs_are_refused_up_front(tmp_path):
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ConfigError, match=r"an existing file, not a folder"):
        check_output_dir(str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'afile'} is an existing file, so no folder can be made"):
        check_output_dir(str(tmp_path / "afile" / "deeper" / "labels"))
    with pytest.raises(ConfigError, match="FIFO"):
        check_output_dir(str(tmp_path / "pipe"))
    check_output_dir(str(tmp_path / "new" / "labels"))  # missing folders are fine: they are created
    (tmp_path / "labels_quarantine").write_text("x")
    cfg = _cfg(tmp_path, "label.tasks=[depth]")
    (tmp_path / "pool").mkdir()
    with pytest.raises(ConfigError, match="labels_quarantine: an existing file"):
        LabelRun(cfg, str(tmp_path / "pool"), str(tmp_path / "labels"))


def test_the_pipeline_checks_label_paths_and_nothing_to_label_says_what_was_found(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="FIFO"):
        check_label_paths(_cfg(tmp_path, f"label.input={tmp_path / 'pipe'}"))
    with pytest.raises(ConfigError, match="an existing file"):
        check_label_paths(_cfg(tmp_path, f"label.output={tmp_path / 'afile'}"))
    check_label_paths(_cfg(tmp_path))  # the default input is the world the pipeline renders first
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "readme.txt").write_text("x")
    os.mkfifo(tmp_path / "pool" / "pipe.jpg")
    with pytest.raises(ConfigError, match=r"nothing to label .*: 1 fifo, 1 not_an_image_suffix\)"):
        LabelRun(_cfg(tmp_path, "label.tasks=[depth]"), str(tmp_path / "pool"), str(tmp_path / "labels")).open()


def test_gif_is_an_input_by_default_and_decodes_its_first_frame(tmp_path):
    cfg = _cfg(tmp_path)
    assert "gif" in cfg.label.extensions
    red, blue = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    frame = decode_image(_gif([red, blue]))
    assert frame.shape == (16, 16, 3) and frame[..., 0].min() > 200 and frame[..., 2].max() < 50


def _table(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_malformed_parquet_tables_are_one_line_errors_before_any_labelling(tmp_path):
    cfg = _cfg(tmp_path)
    pngs = [_png(i, 16) for i in range(3)]
    good = _table(tmp_path / "good.parquet", image=pa.array(pngs, pa.binary()), image_id=["a", "b", "c"])
    cases = {
        "strings.parquet": (dict(image=["/x/a.png", "/x/b.png"]), r"'image' is string \(file paths\?"),
        "int_ids.parquet": (dict(image=pa.array(pngs[:2], pa.binary()), image_id=[1, 2]), r"'image_id' is int64"),
        "null_id.parquet": (dict(image=pa.array(pngs, pa.binary()), image_id=["a", None, "c"]),
                            r"'image_id' is null in row 1"),
        "empty_id.parquet": (dict(image=pa.array(pngs[:1], pa.binary()), image_id=[""]), r"'image_id' is empty"),
        "no_image.parquet": (dict(pixels=pa.array(pngs[:1], pa.binary())), "no 'image' column"),
        "int_source.parquet": (dict(image=pa.array(pngs[:1], pa.binary()), source=[3]), r"'source' is int64"),
    }
    for name, (columns, message) in cases.items():
        path = _table(tmp_path / name, **columns)
        with pytest.raises(ConfigError, match=message) as err:
            list_inputs(cfg, resolve_input(cfg, str(path)))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    data = good.read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.parquet").write_bytes(os.urandom(300))
    for name in ("truncated.parquet", "random.parquet"):
        with pytest.raises(ConfigError, match=r"is not a readable Parquet file .*; replace or remove it"):
            list_inputs(cfg, resolve_input(cfg, str(tmp_path / name)))
    folder = tmp_path / "table"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(data)
    (folder / "b.parquet").write_bytes(data[:100])
    with pytest.raises(ConfigError, match=rf"{folder / 'b.parquet'} is not a readable Parquet file"):
        LabelRun(cfg, str(folder), str(tmp_path / "labels")).open()
    assert not (tmp_path / "labels").exists()  # nothing written before the input was checked


def test_corrupt_image_pages_of_a_readable_table_are_quarantined_not_a_traceback(tmp_path):
    """The footer and the id column read fine (the up-front check passes); the image column's
    pages are garbage: every row of the shard becomes a read_error quarantine row."""
    cfg = _cfg(tmp_path)
    path = _table(tmp_path / "t.parquet", image_id=["a", "b"], image=pa.array([_png(0, 16), _png(1, 16)], pa.binary()))
    column = pq.ParquetFile(path).metadata.row_group(0).column(1)
    data = bytearray(path.read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    data[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))
    inp = resolve_input(cfg, str(path))
    plan = plan_table(list_inputs(cfg, inp), 8)
    prep = prepare_shard(shard_descriptors(plan, [0])[0], make_prepare_context(cfg, inp, 16))
    assert prep.num_good == 0 and prep.reason == ["read_error", "read_error"]
    assert str(path) in prep.detail[0]


def test_quarantine_details_hold_no_object_addresses_and_repeat_exactly(tmp_path):
    with pytest.raises(BadImageError) as err:
        decode_image(b"not an image at all" * 4)
    assert "0x" not in err.value.detail and "0x" not in str(err.value)
    folder = tmp_path / "pool"
    folder.mkdir()
    (folder / "notes.png").write_bytes(b"plain text, not a PNG\n" * 4)
    (folder / "empty.png").write_bytes(b"")
    (folder / "half.png").write_bytes(_png(0)[:60])
    cfg = _cfg(tmp_path)
    inp = resolve_input(cfg, str(folder))
    desc = shard_descriptors(plan_table(list_inputs(cfg, inp), 8), [0])[0]
    ctx = make_prepare_context(cfg, inp, 16)
    keep = [io.BytesIO() for _ in range(50)]  # other live objects: a second run gets other addresses
    first, second = quarantine_rows(prepare_shard(desc, ctx)), quarantine_rows(prepare_shard(desc, ctx))
    assert first.num_rows == 3 and not any("0x" in d for d in first.column("detail").to_pylist())
    bytes_a, bytes_b = io.BytesIO(), io.BytesIO()
    pq.write_table(first, bytes_a)
    pq.write_table(second, bytes_b)
    assert bytes_a.getvalue() == bytes_b.getvalue()
    del keep


def test_an_input_replaced_by_a_fifo_after_listing_is_quarantined_unopened(tmp_path):
    cfg = _cfg(tmp_path)
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.png").write_bytes(_png(0))
    inp = resolve_input(cfg, str(tmp_path / "pool"))
    desc = shard_descriptors(plan_table(list_inputs(cfg, inp), 8), [0])[0]
    (tmp_path / "pool" / "a.png").unlink()
    os.mkfifo(tmp_path / "pool" / "a.png")
    prep = prepare_shard(desc, make_prepare_context(cfg, inp, 16))
    assert prep.reason == ["read_error"] and "FIFO" in prep.detail[0]


def test_labelling_a_malformed_folder_accounts_for_every_entry(ray_session, tmp_path):
    """One real labelling run: rows + quarantined + ignored == every entry; quarantine details are
    those the driver computes for the same shard (no per-process addresses); the headline rate is
    the steady one, with the start-up beside it."""
    folder = tmp_path / "pool"
    expect = write_malformed_folder(folder)
    cfg = _cfg(tmp_path, "label.tasks=[classification]", "label.shard_size=8")
    summary = run_labeling(cfg, str(folder), str(tmp_path / "labels"), log_every_s=1e9)
    assert summary["rows"] + summary["quarantined"] + summary["ignored_files"] == len(expect)
    assert summary["ignored"] == _expected_ignored(expect)
    assert summary["rows"] == 4 and summary["quarantine_reasons"] == {"not_an_image": 1}
    assert summary["startup_s"] > 0 and summary["images_per_s"] >= summary["end_to_end_images_per_s"] > 0
    quarantine = pq.read_table(summary["quarantine"])
    run = LabelRun(cfg, str(folder), str(tmp_path / "labels"))
    plan = run.open()
    expected = quarantine_rows(prepare_shard(plan.descriptors([0])[0], run.prepare_ctx))
    assert quarantine.select(["image_id", "reason", "detail"]).equals(expected.select(["image_id", "reason", "detail"]))


def test_the_job_refuses_a_null_image_id_before_starting_ray(tmp_path):
    pngs = [_png(i, 16) for i in range(2)]
    table = _table(tmp_path / "t.parquet", image=pa.array(pngs, pa.binary()), image_id=["a", None])
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "label.py"), "--input", str(table),
                           "--output", str(tmp_path / "labels"), "--set", f"paths.root={tmp_path}",
                           *[a for s in RANDOM for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "'image_id' is null in row 1" in lines[-1] and str(table) in lines[-1]
    assert "Traceback" not in proc.stderr and "local Ray instance" not in proc.stderr
    assert not (tmp_path / "labels").exists()
