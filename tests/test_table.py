"""The examples table: codecs, schema, provenance, and tables with missing task columns."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from must_ray import table as S
from must_ray.images import decode_png, encode_png
from must_ray.tasks import registered_task_names
from must_ray.tasks.depth import decode_depth, encode_depth
from must_ray.tasks.normals import decode_normals, encode_normals


def test_png_codecs_exact():
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 256, (9, 7), dtype=np.uint8), rng.integers(0, 256, (9, 7, 3), dtype=np.uint8),
                rng.integers(0, 65536, (9, 7), dtype=np.uint16)):
        out = decode_png(encode_png(arr), arr.dtype.type)
        assert out.dtype == arr.dtype and np.array_equal(out, arr)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_png(np.zeros((2, 2), np.float32))


def test_depth_within_one_quantisation_step():
    rng = np.random.default_rng(1)
    scale = 0.001
    depth = rng.uniform(0.3, 19.0, (16, 16)).astype(np.float32)
    depth[0, :4] = 0.0  # invalid stays invalid
    depth[1, 0] = 1e-5  # tiny but valid never becomes "invalid"
    back = decode_depth(encode_depth(depth, scale), scale)
    valid = depth > 0
    assert np.all(back[~valid] == 0) and np.all(back[valid] > 0)
    assert np.abs(back[valid] - depth[valid]).max() <= scale + 1e-6


def test_normals_within_one_degree():
    rng = np.random.default_rng(2)
    n = rng.normal(size=(32, 32, 3)).astype(np.float32)
    n[..., 2] = np.abs(n[..., 2])
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[0, 0] = 0.0  # invalid pixel
    back = decode_normals(encode_normals(n))
    assert np.all(back[0, 0] == 0)
    cos = np.clip((back * n).sum(-1)[1:], -1, 1)
    assert np.degrees(np.arccos(cos)).max() < 1.0
    assert np.allclose(np.linalg.norm(back[1:], axis=-1), 1.0, atol=1e-5)


def _image_row(i: int) -> dict:
    img = np.full((8, 8, 3), i, np.uint8)
    return {"image_id": f"img{i}", "image": encode_png(img), "source": "test", "height": 8, "width": 8}


def test_schema_has_base_and_every_task_column():
    names = registered_task_names()
    schema = S.examples_schema(names)
    assert schema.names[:5] == list(S.BASE_COLUMNS)
    assert S.tasks_in_schema(schema) == list(names)
    for f in schema:
        assert f.nullable == (f.name not in S.BASE_COLUMNS), f.name


def test_missing_task_columns_read_as_masked(tmp_path):
    """A table written with only depth loads, conformed to all tasks, with the others masked."""
    depth = np.full((8, 8), 2.5, np.float32)
    from must_ray.tasks import build_task

    task = build_task("depth", num_classes=3)
    rows = [{**_image_row(0), **task.encode(depth)}, {**_image_row(1), **task.null_cells()}]
    table = S.rows_to_table(rows, ["depth"], provenance={"kind": "test", "classes": ["a", "b", "c"]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)

    loaded = pq.read_table(path)
    assert S.validate_table(loaded) == ["depth"]
    assert S.read_provenance(str(path))["classes"] == ["a", "b", "c"]
    assert S.read_provenance(str(tmp_path))["kind"] == "test"

    full = S.conform(loaded, registered_task_names())
    assert S.tasks_in_schema(full.schema) == list(registered_task_names())
    rows_out = full.to_pylist()
    labels0 = S.decode_labels(rows_out[0], registered_task_names())
    labels1 = S.decode_labels(rows_out[1], registered_task_names())
    assert np.abs(labels0["depth"] - depth).max() <= 0.001
    assert all(labels0[t] is None for t in registered_task_names() if t != "depth")
    assert all(v is None for v in labels1.values())


def test_validate_table_names_the_bad_column():
    table = S.rows_to_table([_image_row(0)], [])
    bad = table.set_column(3, "height", pa.array([8], pa.int64()))
    with pytest.raises(ValueError, match="'height'"):
        S.validate_table(bad)
    with pytest.raises(ValueError, match="'image_id'"):
        S.validate_table(table.drop(["image_id"]))
