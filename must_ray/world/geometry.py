"""Closed-form ray/primitive intersections and surface normals, vectorised over arrays of rays.

Every function works in an object's local frame (origin on the floor under the object, y up) and
takes the ray origin ``o`` and direction ``d`` as triples of arrays that broadcast against each
other and against the size parameters ``s0, s1, s2`` (see ``scenes._sample_size``). Directions need
not be unit length: ``t`` is in units of ``d``, and a miss (or a hit at ``t <= EPS``) is ``inf``.
Only exact IEEE arithmetic (+ - * / sqrt floor) is used per ray, so a ray's result never depends on
where it sits in the array - the renderer's batch-independence rests on this.
"""
from __future__ import annotations

import numpy as np

from must_ray.world.scenes import BOX, CONE, CYLINDER, SPHERE, TORUS

EPS = np.float32(1e-4)
INF = np.float32(np.inf)
TORUS_SAMPLES = 32  # root-bracketing samples along the torus' bounding interval
TORUS_BISECTIONS = 10


def intersect(category: int, o, d, s0, s1, s2) -> np.ndarray:
    """Ray parameter of the nearest hit in front of the origin, ``inf`` on a miss."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _INTERSECT[category](o, d, s0, s1, s2)


def local_normal(category: int, p, s0, s1, s2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outward surface normal (not normalised) at local surface points ``p``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _NORMAL[category](p, s0, s1, s2)


# ----------------------------------------------------------------------------- intersections


def _sphere(o, d, r, _s1, _s2):
    ox, oy, oz = o
    dx, dy, dz = d
    oy = oy - r  # centre at (0, r, 0)
    a = dx * dx + dy * dy + dz * dz
    b = ox * dx + oy * dy + oz * dz
    c = ox * ox + oy * oy + oz * oz - r * r
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    return np.where((disc >= 0) & (t > EPS), t, INF)


def _box(o, d, hx, hy, hz):
    ox, oy, oz = o
    oy = oy - hy  # centre at (0, hy, 0)
    near = far = None
    for oc, dc, h in ((ox, d[0], hx), (oy, d[1], hy), (oz, d[2], hz)):
        inv = 1.0 / dc
        t1 = (-h - oc) * inv
        t2 = (h - oc) * inv
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        near = lo if near is None else np.maximum(near, lo)
        far = hi if far is None else np.minimum(far, hi)
    return np.where((near <= far) & (near > EPS), near, INF)


def _cylinder(o, d, r, h, _s2):
    """Vertical cylinder, radius r, y in [0, h]; side + top cap (the bottom rests on the floor)."""
    ox, oy, oz = o
    dx, dy, dz = d
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - r * r
    disc = b * b - a * c
    ts = (-b - np.sqrt(np.maximum(disc, 0))) / a
    ys = oy + ts * dy
    side = np.where((disc >= 0) & (ts > EPS) & (ys >= 0) & (ys <= h), ts, INF)
    tc = (h - oy) / dy
    xc, zc = ox + tc * dx, oz + tc * dz
    cap = np.where((tc > EPS) & (xc * xc + zc * zc <= r * r), tc, INF)
    return np.minimum(side, cap)


def _cone(o, d, r, h, _s2):
    """Upright cone, base radius r on the floor, apex at (0, h, 0): x^2 + z^2 = k^2 (h - y)^2."""
    ox, oy, oz = o
    dx, dy, dz = d
    k2 = (r / h) * (r / h)
    y0 = h - oy
    a = dx * dx + dz * dz - k2 * dy * dy
    b = ox * dx + oz * dz + k2 * y0 * dy
    c = ox * ox + oz * oz - k2 * y0 * y0
    disc = b * b - a * c
    s = np.sqrt(np.maximum(disc, 0))
    q = -(b + np.where(b >= 0, s, -s))  # numerically stable pair of roots q / a and c / q
    best = INF
    for t in (q / a, c / q):
        y = oy + t * dy
        best = np.minimum(best, np.where((disc >= 0) & (t > EPS) & (y >= 0) & (y <= h), t, INF))
    return best


def _torus(o, d, big, small, _s2):
    """Torus lying flat on the floor: centre (0, small, 0), major radius big, tube radius small.

    The quartic is solved by bracketing: sample it along the ray's stretch inside the bounding
    cylinder, take the first sign change, refine by bisection plus one secant step (float64). Rays
    that only graze the tube between two samples are missed, which at worst trims silhouettes by a
    sliver; the labels come from the same hits, so they stay consistent with the image."""
    shape = np.broadcast_shapes(*(np.shape(x) for x in (*o, *d, big, small)))
    ox, oy, oz, dx, dy, dz, big, small = (np.broadcast_to(x, shape) for x in (*o, *d, big, small))
    oy = oy - small
    inv = 1.0 / dy
    t1, t2 = (-small - oy) * inv, (small - oy) * inv
    lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
    rb = big + small
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - rb * rb)
    s = np.sqrt(np.maximum(disc, 0))
    lo = np.maximum(np.maximum(lo, (-b - s) / a), EPS)
    hi = np.minimum(hi, (-b + s) / a)
    cand = (disc > 0) & (lo < hi)
    out = np.full(shape, INF, dtype=np.float32)
    if not cand.any():
        return out
    ox, oy, oz, dx, dy, dz, big, small, lo, hi = (
        x[cand].astype(np.float64) for x in (ox, oy, oz, dx, dy, dz, big, small, lo, hi))
    r2d = big * big - small * small
    four_b2 = 4.0 * big * big

    def f(t):
        px, py, pz = ox + t * dx, oy + t * dy, oz + t * dz
        rho2 = px * px + pz * pz
        g = rho2 + py * py + r2d
        return g * g - four_b2 * rho2

    frac = np.linspace(0.0, 1.0, TORUS_SAMPLES)[:, None]
    ts = lo + (hi - lo) * frac
    inside = f(ts) < 0
    found = inside.any(axis=0)
    j = inside.argmax(axis=0)
    cols = np.arange(j.size)
    ta, tb = ts[np.maximum(j - 1, 0), cols], ts[j, cols]
    for _ in range(TORUS_BISECTIONS):
        tm = 0.5 * (ta + tb)
        neg = f(tm) < 0
        tb = np.where(neg, tm, tb)
        ta = np.where(neg, ta, tm)
    fa, fb = f(ta), f(tb)
    t = np.where(fa > fb, ta + (tb - ta) * fa / np.where(fa > fb, fa - fb, 1.0), tb)
    t = np.where(j == 0, lo, t)
    out[cand] = np.where(found, t, np.inf).astype(np.float32)
    return out


_INTERSECT = {SPHERE: _sphere, BOX: _box, CYLINDER: _cylinder, CONE: _cone, TORUS: _torus}


# ----------------------------------------------------------------------------- normals


def _sphere_normal(p, r, _s1, _s2):
    return p[0], p[1] - r, p[2]


def _box_normal(p, hx, hy, hz):
    qx, qy, qz = p[0] / hx, (p[1] - hy) / hy, p[2] / hz
    ax, ay, az = np.abs(qx), np.abs(qy), np.abs(qz)
    is_x = (ax >= ay) & (ax >= az)
    is_y = ~is_x & (ay >= az)
    is_z = ~is_x & ~is_y
    return np.sign(qx) * is_x, np.sign(qy) * is_y, np.sign(qz) * is_z


def _cylinder_normal(p, r, h, _s2):
    x, y, z = p
    rho = np.sqrt(x * x + z * z)
    cap = np.abs(y - h) < np.abs(rho - r)
    return np.where(cap, 0, x), np.where(cap, 1, 0).astype(x.dtype), np.where(cap, 0, z)


def _cone_normal(p, r, h, _s2):
    x, y, z = p
    k2 = (r / h) * (r / h)
    return x, k2 * (h - y), z


def _torus_normal(p, big, small, _s2):
    x, y, z = p
    shrink = 1.0 - big / np.sqrt(x * x + z * z)
    return x * shrink, y - small, z * shrink


_NORMAL = {SPHERE: _sphere_normal, BOX: _box_normal, CYLINDER: _cylinder_normal, CONE: _cone_normal,
           TORUS: _torus_normal}
