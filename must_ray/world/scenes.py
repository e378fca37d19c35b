"""Scene sampling: every random choice of a world scene, as plain Python values.

A scene is a pure function of ``(seed, index, domain, min_objects, max_objects)``: its generator is
``np.random.default_rng([seed, index, domain_id])``, so it never depends on which other scenes are
rendered with it, nor on the image size (the same scene can be rendered at any resolution).

World frame: metres, y up, the floor is the plane y = 0. The room is the axis-aligned box
``[x0, x1] x [0, height] x [z0, z1]`` around the camera, so every camera ray hits something. The
camera stands near z = 0 and looks roughly along -z, pitched down at the floor, where the objects
rest. Each object has its own local frame: origin on the floor under its centre, y up, rotated by
``yaw`` about the vertical axis.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

CATEGORIES: tuple[str, ...] = ("sphere", "box", "cylinder", "cone", "torus")
NUM_CATEGORIES = len(CATEGORIES)
SPHERE, BOX, CYLINDER, CONE, TORUS = range(NUM_CATEGORIES)

DOMAINS: tuple[str, ...] = ("default", "dim", "bright", "cluttered")


@dataclass(frozen=True)
class DomainConfig:
    """How a domain shifts the scene distribution (lighting, clutter, texture busyness)."""

    intensity: tuple[float, float]  # directional light intensity range
    ambient: tuple[float, float]  # ambient term range
    extra_objects: tuple[int, int]  # added to (min_objects, max_objects)
    plain_prob: float  # probability that an object is untextured
    frequency: tuple[float, float]  # object texture frequency range, cycles per metre
    tile: tuple[float, float]  # floor tile size range, metres
    busy: bool = False  # room surfaces always patterned, walls at twice the frequency


DOMAIN_CONFIGS: dict[str, DomainConfig] = {
    "default": DomainConfig((0.75, 0.95), (0.20, 0.30), (0, 0), 0.30, (2.0, 5.0), (0.5, 1.2)),
    "dim": DomainConfig((0.22, 0.35), (0.04, 0.08), (0, 0), 0.30, (2.0, 5.0), (0.5, 1.2)),
    "bright": DomainConfig((1.05, 1.25), (0.35, 0.45), (0, 0), 0.30, (2.0, 5.0), (0.5, 1.2)),
    "cluttered": DomainConfig((0.75, 0.95), (0.20, 0.30), (2, 3), 0.05, (4.0, 9.0), (0.25, 0.6), busy=True),
}


@dataclass(frozen=True)
class Material:
    """A two-colour solid texture: ``albedo = color1`` where ``pattern(p) == 0`` else ``color2``.

    ``pattern(p) = (sum_i floor(axes[i] . p + phases[i])) mod 2`` on the local hit point ``p``:
    one non-zero axis gives stripes, three give a 3D checker, zero axes a plain colour."""

    color1: tuple[float, float, float]
    color2: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...]  # 3 vectors, cycles per metre
    phases: tuple[float, float, float]


@dataclass(frozen=True)
class SceneObject:
    category: int
    x: float  # floor position of the local origin (world x, z)
    z: float
    yaw: float  # radians about +y
    size: tuple[float, float, float]  # per category, see _sample_size
    material: Material
    footprint: float  # radius of a vertical cylinder holding the object


@dataclass(frozen=True)
class Scene:
    seed: int
    index: int
    domain: str
    cam_pos: tuple[float, float, float]
    cam_yaw: float  # radians, 0 = looking along -z
    cam_pitch: float  # radians, > 0 = looking down
    fov: float  # full field of view, radians (square images)
    room: tuple[float, float, float, float, float]  # x0, x1, z0, z1, height
    light_dir: tuple[float, float, float]  # unit vector toward the light
    light_color: tuple[float, float, float]  # colour times intensity
    ambient: float
    floor: Material
    walls: Material
    ceiling: Material
    objects: tuple[SceneObject, ...]

    def camera_basis(self) -> tuple[tuple[float, float, float], ...]:
        """(right, up, forward) unit vectors in the world frame."""
        cy, sy = math.cos(self.cam_yaw), math.sin(self.cam_yaw)
        cp, sp = math.cos(self.cam_pitch), math.sin(self.cam_pitch)
        forward = (-sy * cp, -sp, -cy * cp)
        right = (cy, 0.0, -sy)
        up = (-sy * sp, cp, -cy * sp)  # back x right, back = -forward
        return right, up, forward

    def meta(self, image_size: int) -> dict[str, Any]:
        """Plain-Python description of the scene (camera, light, room, objects)."""
        right, up, forward = self.camera_basis()
        f = image_size / 2.0 / math.tan(self.fov / 2.0)
        return {
            "seed": self.seed,
            "index": self.index,
            "domain": self.domain,
            "num_objects": len(self.objects),
            "camera": {
                "position": list(self.cam_pos),
                "yaw_deg": math.degrees(self.cam_yaw),
                "pitch_deg": math.degrees(self.cam_pitch),
                "fov_deg": math.degrees(self.fov),
                "intrinsics": {"fx": f, "fy": f, "cx": image_size / 2.0, "cy": image_size / 2.0},
                # columns of the camera-to-world rotation (OpenGL camera: x right, y up, z back)
                "right": list(right), "up": list(up), "back": [-c for c in forward],
            },
            "light": {"direction": list(self.light_dir), "color": list(self.light_color), "ambient": self.ambient},
            "room": dict(zip(("x0", "x1", "z0", "z1", "height"), self.room)),
            "objects": [
                {"category": CATEGORIES[o.category], "position": [o.x, 0.0, o.z], "yaw": o.yaw, "size": list(o.size)}
                for o in self.objects
            ],
        }


def domain_id(domain: str) -> int:
    """The domain's position in :data:`DOMAINS` (part of the scene seed)."""
    try:
        return DOMAINS.index(domain)
    except ValueError:
        raise ValueError(f"unknown world domain {domain!r}; known: {', '.join(DOMAINS)}") from None


def sample_scene(seed: int, index: int, domain: str = "default", min_objects: int = 2, max_objects: int = 5) -> Scene:
    """Draw scene ``(seed, index)`` of ``domain``: camera, room, light, materials and objects.

    Objects are placed by rejection sampling so their footprints never overlap (no
    interpenetration); an object that finds no free spot in 40 tries is dropped, so a scene can hold
    fewer objects than drawn (its ``meta["num_objects"]`` is the truth)."""
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    cfg = DOMAIN_CONFIGS[DOMAINS[domain_id(domain)]]
    rng = np.random.default_rng([int(seed), int(index), domain_id(domain)])
    u = rng.uniform

    # Camera and room.
    cam_pitch = math.radians(u(20.0, 34.0))
    cam_yaw = math.radians(u(-12.0, 12.0))
    fov = math.radians(u(48.0, 60.0))
    cam_pos = (u(-0.6, 0.6), u(1.7, 2.6), u(-0.3, 0.3))
    half_width = u(4.0, 6.0)
    room = (-half_width, half_width, -u(9.0, 12.0), u(2.0, 3.0), u(3.6, 5.0))

    # Light: from above, random azimuth; domain sets strength and ambient.
    elev, azim = math.radians(u(30.0, 65.0)), u(0.0, 2.0 * math.pi)
    light_dir = (math.cos(elev) * math.sin(azim), math.sin(elev), math.cos(elev) * math.cos(azim))
    intensity = u(*cfg.intensity)
    tint = (u(0.9, 1.0), u(0.9, 1.0), u(0.9, 1.0))
    light_color = tuple(intensity * c / max(tint) for c in tint)
    ambient = u(*cfg.ambient)

    floor, walls, ceiling = _room_materials(rng, cfg)

    # Objects.
    n = int(rng.integers(min_objects + cfg.extra_objects[0], max_objects + cfg.extra_objects[1] + 1))
    near = cam_pos[1] / math.tan(cam_pitch + fov / 2.0)  # closest floor distance in view
    objects: list[SceneObject] = []
    for _ in range(n):
        obj = _place_object(rng, cfg, objects, cam_pos, cam_yaw, fov, near, room)
        if obj is not None:
            objects.append(obj)
    return Scene(int(seed), int(index), domain, cam_pos, cam_yaw, cam_pitch, fov, room, light_dir,
                 light_color, ambient, floor, walls, ceiling, tuple(objects))


# ----------------------------------------------------------------------------- helpers


def _color(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(*sat), rng.uniform(*val))


_ZERO = (0.0, 0.0, 0.0)


def _room_materials(rng: np.random.Generator, cfg: DomainConfig) -> tuple[Material, Material, Material]:
    # Floor: tiles (checker) or planks (stripes) or plain, muted colours.
    c1 = _color(rng, (0.05, 0.45), (0.35, 0.8))
    c2 = tuple(c * rng.uniform(0.55, 0.85) for c in c1)
    f = 1.0 / rng.uniform(*cfg.tile)
    kind = 1 + rng.integers(2) if cfg.busy else rng.integers(3)
    if kind == 0:
        axes = (_ZERO, _ZERO, _ZERO)
    elif kind == 1:
        axes = ((f, 0.0, 0.0), (0.0, 0.0, f), _ZERO)
    else:
        a = rng.uniform(0.0, math.pi)
        axes = ((f * math.cos(a), 0.0, f * math.sin(a)), _ZERO, _ZERO)
    floor = Material(c1, c2, axes, (rng.uniform(0, 1), rng.uniform(0, 1), 0.5))

    # Walls: plain, vertical stripes or horizontal bands; the phase of a zero axis is 0.5 so that
    # floor(0 + 0.5) stays 0 whatever rounding puts the hit point at.
    c1 = _color(rng, (0.05, 0.5), (0.45, 0.9))
    c2 = _color(rng, (0.05, 0.5), (0.45, 0.9)) if rng.random() < 0.5 else tuple(c * 0.8 for c in c1)
    f = rng.uniform(1.0, 3.0) * (2.0 if cfg.busy else 1.0)
    kind = 1 + rng.integers(2) if cfg.busy else rng.integers(3)
    axes = ((_ZERO, _ZERO, _ZERO), ((f, 0.0, f), _ZERO, _ZERO), ((0.0, f, 0.0), _ZERO, _ZERO))[kind]
    walls = Material(c1, c2, axes, (rng.uniform(0, 1), 0.5, 0.5))

    c = _color(rng, (0.0, 0.15), (0.6, 0.9))
    ceiling = Material(c, c, (_ZERO, _ZERO, _ZERO), (0.5, 0.5, 0.5))
    return floor, walls, ceiling


def _object_material(rng: np.random.Generator, cfg: DomainConfig) -> Material:
    c1 = _color(rng, (0.25, 0.95), (0.35, 0.95))
    c2 = _color(rng, (0.2, 0.95), (0.3, 0.95)) if rng.random() < 0.6 else tuple(c * rng.uniform(0.3, 0.7) for c in c1)
    phases = (rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, 1))
    f = rng.uniform(*cfg.frequency)
    r = rng.random()
    if r < cfg.plain_prob:
        return Material(c1, c1, (_ZERO, _ZERO, _ZERO), (0.5, 0.5, 0.5))
    if r < cfg.plain_prob + (1.0 - cfg.plain_prob) / 2.0:  # stripes along a random direction
        v = rng.normal(size=3)
        v = v / max(float(np.linalg.norm(v)), 1e-6)
        return Material(c1, c2, ((f * v[0], f * v[1], f * v[2]), _ZERO, _ZERO), phases)
    return Material(c1, c2, ((f, 0.0, 0.0), (0.0, f, 0.0), (0.0, 0.0, f)), phases)  # 3D checker


def _sample_size(rng: np.random.Generator, category: int) -> tuple[tuple[float, float, float], float]:
    """Per-category size parameters (metres) and footprint radius.

    sphere (r, -, -); box (half x, half y, half z); cylinder (r, height, -); cone (base r, height, -);
    torus (major R, minor r, -) lying flat on the floor."""
    u = rng.uniform
    if category == SPHERE:
        r = u(0.25, 0.6)
        return (r, 0.0, 0.0), r
    if category == BOX:
        hx, hy, hz = u(0.2, 0.55), u(0.15, 0.6), u(0.2, 0.55)
        return (hx, hy, hz), math.hypot(hx, hz)
    if category == CYLINDER:
        r = u(0.18, 0.45)
        return (r, u(0.4, 1.4), 0.0), r
    if category == CONE:
        r = u(0.25, 0.55)
        return (r, u(0.6, 1.5), 0.0), r
    big = u(0.3, 0.55)
    small = big * u(0.25, 0.45)
    return (big, small, 0.0), big + small


def _place_object(rng, cfg, placed, cam_pos, cam_yaw, fov, near, room) -> SceneObject | None:
    category = int(rng.integers(NUM_CATEGORIES))
    size, footprint = _sample_size(rng, category)
    yaw = rng.uniform(0.0, 2.0 * math.pi)
    material = _object_material(rng, cfg)
    x0, x1, z0, _, _ = room
    fx, fz = -math.sin(cam_yaw), -math.cos(cam_yaw)  # horizontal forward
    rx, rz = math.cos(cam_yaw), -math.sin(cam_yaw)  # horizontal right
    tan_half = math.tan(fov / 2.0)
    for _ in range(40):
        dist = rng.uniform(near + 0.1, near + 4.5)
        lateral = rng.uniform(-0.85, 0.85) * dist * tan_half
        x = cam_pos[0] + dist * fx + lateral * rx
        z = cam_pos[2] + dist * fz + lateral * rz
        if not (x0 + footprint < x < x1 - footprint and z > z0 + footprint):
            continue
        if math.hypot(x - cam_pos[0], z - cam_pos[2]) < footprint + 0.5:
            continue
        if all(math.hypot(x - o.x, z - o.z) > footprint + o.footprint + 0.02 for o in placed):
            return SceneObject(category, x, z, yaw, size, material, footprint)
    return None
