"""The batch ray caster: scenes -> RGB image + exact raw render buffers (depth, normals, instances).

One primary ray per pixel centre, so every label is exact per pixel and consistent with the image.
Per-scene numpy overhead would dominate at small image sizes, so a batch of B scenes is rendered
together: rays for all B*H*W pixels at once, each scene's object list padded to K slots, and one
numpy pass per primitive *category* over all (scene, slot) pairs of that category. Shading is a
Lambertian directional light plus ambient, with cast shadows (shadow rays against all objects;
the room itself casts none), and a two-colour procedural solid texture per surface.

Per-ray work is elementwise IEEE arithmetic only (no transcendentals, no BLAS), so a scene renders
byte-identically whatever batch it is in.

The renderer knows no task: each task derives its ground truth from these buffers
(``Task.world_label``, see :mod:`must_ray.world.labels`).
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np

from must_ray.world.geometry import INF, intersect, local_normal
from must_ray.world.scenes import NUM_CATEGORIES, Material, Scene, sample_scene

MIN_VISIBLE_PIXELS = 4  # an instance needs this many visible pixels to get a detection box
BATCH_RAYS = 1 << 16  # rays per internal batch (16 scenes at 64x64): cache-friendly chunks
SHADOW_OFFSET = np.float32(1e-3)  # metres along the normal, against shadow acne

# Columns of the per-(scene, material slot) parameter table.
_TYPE, _CX, _CZ, _COS, _SIN, _S0, _S1, _S2 = range(8)
_C1, _C2, _AX, _PH = 8, 11, 14, 23
_NCOLS = 26
_ROOM = -1  # type of the room materials (floor, walls, ceiling)
_EMPTY = -2  # type of a padding slot


def render_scenes(seed: int, indices: Sequence[int], image_size: int = 64, domain: str = "default",
                  min_objects: int = 2, max_objects: int = 5,
                  min_visible_pixels: int = MIN_VISIBLE_PIXELS) -> list[dict[str, Any]]:
    """Render world scenes ``(seed, index)`` for each index: the image and its raw render buffers.

    Each scene is a pure function of (seed, index, image_size, domain, min/max objects): the same
    inputs give byte-identical arrays whatever other indices are in the batch, so any split can be
    regenerated anywhere, in any partition. Returns one dict of buffers per index (see the package
    docstring for the exact forms): ``image``, ``depth``, ``normals``, ``instances``,
    ``instance_categories``, ``instance_pixels``, ``instance_boxes``, ``instance_visible``
    (>= ``min_visible_pixels`` pixels) and ``meta``."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    scenes = [sample_scene(seed, int(i), domain, min_objects, max_objects) for i in indices]
    chunk = max(1, BATCH_RAYS // (image_size * image_size))
    out: list[dict[str, Any]] = []
    for start in range(0, len(scenes), chunk):
        out.extend(render_batch(scenes[start:start + chunk], image_size, min_visible_pixels))
    return out


def render_batch(scenes: Sequence[Scene], image_size: int,
                 min_visible_pixels: int = MIN_VISIBLE_PIXELS) -> list[dict[str, Any]]:
    """Render already-sampled scenes in one vectorised pass (see :func:`render_scenes`)."""
    if not scenes:
        return []
    size = image_size
    B, P = len(scenes), size * size
    K = max(1, max(len(s.objects) for s in scenes))
    table = _pack_materials(scenes, K)  # (B, K + 3, NCOLS)
    cam = _camera_arrays(scenes)  # name -> (B, 1)

    # Primary rays: camera-frame direction (xc, yc, -1), so the ray parameter is the z-depth.
    centres = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(2.0 / size) - 1
    xc = np.tile(centres, size)[None, :] * cam["tan"]  # (B, P)
    yc = np.repeat(-centres, size)[None, :] * cam["tan"]
    d = tuple(xc * cam["r" + a] + yc * cam["u" + a] + cam["f" + a] for a in "xyz")
    o = (cam["ox"], cam["oy"], cam["oz"])

    t_room, surface, room_normal = _room_hits(o, d, cam)
    t_obj = np.full((B, K, P), INF, dtype=np.float32)
    for category, bi, ki, prm in _slots_by_category(table, K):
        lo, ld = _to_local(prm, tuple(c[bi] for c in o), tuple(c[bi] for c in d))
        t_obj[bi, ki] = intersect(category, lo, ld, prm[_S0], prm[_S1], prm[_S2])
    slot = t_obj.argmin(axis=1)
    t_best = np.take_along_axis(t_obj, slot[:, None], axis=1)[:, 0]
    hit = t_best < t_room
    depth = np.where(hit, t_best, t_room)
    instances = np.where(hit, slot, -1).astype(np.int32)
    material = np.where(hit, slot, K + surface)

    # Per-pixel parameters of the surface hit, then normals, texture and shading.
    flat = (np.arange(B)[:, None] * (K + 3) + material).ravel()
    px = table.reshape(-1, _NCOLS).T.copy()[:, flat]  # (NCOLS, B*P)
    dflat = tuple(c.ravel() for c in d)
    p = tuple((oc + depth * dc).ravel() for oc, dc in zip(o, d))
    lp = _to_local(px, p, None)[0]
    n_world = _world_normals(px, lp, room_normal, dflat)
    albedo = _albedo(px, lp)
    lit = _light(table, K, cam, p, n_world, (B, P))
    image = _tonemap(albedo, lit, cam, (B, size))
    n_cam = [sum(n_world[i] * cam[a + "xyz"[i]].repeat(P) for i in range(3)) for a in ("r", "u", "b")]
    n_cam = np.stack(n_cam, axis=-1).reshape(B, size, size, 3)
    return _assemble(scenes, table, K, size, image, depth.reshape(B, size, size), n_cam,
                     instances.reshape(B, size, size), min_visible_pixels)


def measure_render_speed(n: int = 512, image_size: int = 64) -> float:
    """Images per second of :func:`render_scenes` in this process (after a small warm-up).

    For the one-core figure run under ``OMP_NUM_THREADS=1 taskset -c 0``."""
    render_scenes(0, range(8), image_size)
    start = time.perf_counter()
    render_scenes(0, range(n), image_size)
    return n / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- batch set-up


def _material_row(m: Material) -> list[float]:
    return [*m.color1, *m.color2, *(c for axis in m.axes for c in axis), *m.phases]


def _pack_materials(scenes: Sequence[Scene], K: int) -> np.ndarray:
    """Table (B, K + 3, NCOLS): object slots 0..K-1 (padding has type _EMPTY), then floor, walls,
    ceiling. Room rows have the identity frame, so one code path serves every surface."""
    table = np.zeros((len(scenes), K + 3, _NCOLS), dtype=np.float64)
    table[:, :, _TYPE] = _EMPTY
    table[:, :, _COS] = 1.0
    for b, scene in enumerate(scenes):
        for k, ob in enumerate(scene.objects):
            table[b, k, :_C1] = (ob.category, ob.x, ob.z, math.cos(ob.yaw), math.sin(ob.yaw), *ob.size)
            table[b, k, _C1:] = _material_row(ob.material)
        for j, m in enumerate((scene.floor, scene.walls, scene.ceiling)):
            table[b, K + j, _TYPE] = _ROOM
            table[b, K + j, _C1:] = _material_row(m)
    return table.astype(np.float32)


def _camera_arrays(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """Per-scene camera, room and light values as float32 (B, 1) columns."""
    cols: dict[str, list[float]] = {}
    for s in scenes:
        right, up, forward = s.camera_basis()
        values = {"tan": math.tan(s.fov / 2.0), "ambient": s.ambient}
        values.update(zip(("ox", "oy", "oz"), s.cam_pos))
        for prefix, vec in (("r", right), ("u", up), ("f", forward), ("b", tuple(-c for c in forward)),
                            ("l", s.light_dir), ("lc", s.light_color)):
            values.update(zip((prefix + "x", prefix + "y", prefix + "z"), vec))
        values.update(zip(("x0", "x1", "z0", "z1", "height"), s.room))
        for key, v in values.items():
            cols.setdefault(key, []).append(v)
    return {k: np.asarray(v, dtype=np.float32)[:, None] for k, v in cols.items()}


def _slots_by_category(table: np.ndarray, K: int):
    """Yield (category, scene indices, slot indices, params (NCOLS, N, 1)) per present category."""
    types = table[:, :K, _TYPE]
    for category in range(NUM_CATEGORIES):
        bi, ki = np.nonzero(types == category)
        if bi.size:
            yield category, bi, ki, table[bi, ki].T[:, :, None]


def _to_local(prm, p, d):
    """World points (and directions) -> the local frames given by ``prm`` (translate, un-yaw)."""
    c, s = prm[_COS], prm[_SIN]
    wx, wz = p[0] - prm[_CX], p[2] - prm[_CZ]
    lp = (c * wx + s * wz, p[1], c * wz - s * wx)
    ld = None if d is None else (c * d[0] + s * d[2], d[1], c * d[2] - s * d[0])
    return lp, ld


# ----------------------------------------------------------------------------- surfaces


def _room_hits(o, d, cam):
    """Exit point of each ray from the room box: t, surface id (0 floor, 1 wall, 2 ceiling), and
    the inward normal."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = []
        for oc, dc, lo, hi in ((o[0], d[0], cam["x0"], cam["x1"]), (o[1], d[1], 0.0, cam["height"]),
                               (o[2], d[2], cam["z0"], cam["z1"])):
            inv = 1.0 / dc
            ts.append(np.maximum((lo - oc) * inv, (hi - oc) * inv))  # origin inside: the exit
    tx, ty, tz = ts
    is_y = (ty <= tx) & (ty <= tz)
    is_x = ~is_y & (tx <= tz)
    is_z = ~is_y & ~is_x
    t = np.minimum(np.minimum(tx, ty), tz)
    surface = np.where(is_y, np.where(d[1] < 0, 0, 2), 1)
    normal = tuple((-np.sign(dc) * m).ravel() for dc, m in zip(d, (is_x, is_y, is_z)))
    return t, surface, normal


def _world_normals(px, lp, room_normal, d):
    """Unit world-frame normals of the hit surfaces, flipped to face the camera."""
    types = px[_TYPE]
    n = [room_normal[i].astype(np.float32).copy() for i in range(3)]
    for category in range(NUM_CATEGORIES):
        idx = np.nonzero(types == category)[0]
        if idx.size:
            sub = local_normal(category, tuple(c[idx] for c in lp), px[_S0][idx], px[_S1][idx], px[_S2][idx])
            for i in range(3):
                n[i][idx] = sub[i]
    inv = 1.0 / np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
    c, s = px[_COS], px[_SIN]
    lx, ly, lz = n[0] * inv, n[1] * inv, n[2] * inv
    wx, wz = c * lx - s * lz, s * lx + c * lz
    flip = np.where(wx * d[0] + ly * d[1] + wz * d[2] > 0, np.float32(-1), np.float32(1))
    return wx * flip, ly * flip, wz * flip


def _albedo(px, lp):
    """Two-colour solid texture (see scenes.Material) evaluated at local hit points."""
    g = 0
    for i in range(3):
        a = _AX + 3 * i
        g = g + np.floor(lp[0] * px[a] + lp[1] * px[a + 1] + lp[2] * px[a + 2] + px[_PH + i])
    pattern = g - 2 * np.floor(g * 0.5)
    return [px[_C1 + i] + (px[_C2 + i] - px[_C1 + i]) * pattern for i in range(3)]


def _light(table, K, cam, p, n, shape):
    """Lambert factor n.l, zeroed where a shadow ray toward the light hits any object."""
    B, P = shape
    ndl = np.maximum(sum(n[i] * np.repeat(cam["l" + a][:, 0], P) for i, a in enumerate("xyz")), 0)
    origin = tuple((pc + nc * SHADOW_OFFSET).reshape(B, P) for pc, nc in zip(p, n))
    light = (cam["lx"], cam["ly"], cam["lz"])
    blocked = np.zeros((B, K, P), dtype=bool)
    for category, bi, ki, prm in _slots_by_category(table, K):
        lo, ld = _to_local(prm, tuple(c[bi] for c in origin), tuple(c[bi] for c in light))
        blocked[bi, ki] = intersect(category, lo, ld, prm[_S0], prm[_S1], prm[_S2]) < INF
    return np.where(blocked.any(axis=1).ravel(), np.float32(0), ndl)


def _tonemap(albedo, lit, cam, shape):
    """Linear radiance -> uint8 sRGB-ish (gamma 2, i.e. a square root)."""
    B, size = shape
    P = size * size
    amb = np.repeat(cam["ambient"][:, 0], P)
    chans = []
    for i, a in enumerate("xyz"):
        radiance = albedo[i] * (amb + np.repeat(cam["lc" + a][:, 0], P) * lit)
        chans.append(np.sqrt(np.clip(radiance, 0, 1)) * np.float32(255) + np.float32(0.5))
    return np.stack(chans, axis=-1).astype(np.uint8).reshape(B, size, size, 3)


# ----------------------------------------------------------------------------- labels


def _assemble(scenes, table, K, size, image, depth, normals, instances, min_visible):
    """Per-scene buffer dicts from the batch arrays, with per-instance measurements (category,
    visible pixels, tight box) for the tasks to derive their labels from."""
    onehot = instances[:, None] == np.arange(K, dtype=np.int32)[None, :, None, None]  # (B, K, H, W)
    counts = onehot.sum(axis=(2, 3))
    rows, cols = onehot.any(axis=3), onehot.any(axis=2)
    y0, y1 = rows.argmax(axis=2), size - rows[:, :, ::-1].argmax(axis=2)
    x0, x1 = cols.argmax(axis=2), size - cols[:, :, ::-1].argmax(axis=2)
    boxes = np.stack([x0, y0, x1, y1], axis=-1).astype(np.float32) / np.float32(size)
    cats = table[:, :K, _TYPE].astype(np.int32)
    out = []
    for b, scene in enumerate(scenes):
        n = len(scene.objects)
        out.append({
            "image": image[b].copy(),
            "depth": depth[b].copy(),
            "normals": normals[b].copy(),
            "instances": instances[b].copy(),
            "instance_categories": cats[b, :n].copy(),
            "instance_pixels": counts[b, :n].astype(np.int64),
            "instance_boxes": boxes[b, :n].copy(),
            "instance_visible": counts[b, :n] >= min_visible,
            "meta": scene.meta(size),
        })
    return out
