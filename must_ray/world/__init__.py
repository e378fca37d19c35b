"""The embedded synthetic world: procedural 3D scenes with exact ground truth for every task.

A camera stands in a room (floor, walls, ceiling; each with its own random colours and procedural
texture) and looks down at several primitives resting on the floor. The category of an object is
its *shape* - one of :data:`CATEGORIES` - while colours and textures are random per instance, so
colour says nothing about class. Objects have random position, size, yaw and a two-colour solid
texture (plain, stripes or 3D checker); their footprints never overlap, but they may occlude each
other. One directional light gives Lambertian shading with cast shadows, plus ambient light.

A scene is a pure function of ``(seed, index, domain, min_objects, max_objects)`` (and the image
size for its pixels), so any split can be regenerated anywhere. Domains shift the distribution:
``default``, ``dim`` (weak light, low ambient), ``bright``, ``cluttered`` (more objects, busier
textures).

:func:`render_scenes` returns, per scene, its raw render buffers (numpy arrays; ``n`` = the
scene's objects):

- ``image``: uint8 (H, W, 3) RGB.
- ``depth``: float32 (H, W) z-depth in metres (distance along the optical axis), > 0 everywhere.
- ``normals``: float32 (H, W, 3) unit normals in the camera frame (x right, y up, z toward the
  viewer), each facing the camera (n . view_ray < 0; hence n_z > 0 except on surfaces seen almost
  edge-on near the image border).
- ``instances``: int32 (H, W) object index (-1 = room).
- ``instance_categories``: int32 (n,) each object's category (its shape).
- ``instance_pixels``: int64 (n,) each object's visible pixels.
- ``instance_boxes``: float32 (n, 4) each object's tight box around its visible pixels, normalised
  xyxy (x0 = min column / W, x1 = (max column + 1) / W, same for y); meaningless without pixels.
- ``instance_visible``: bool (n,) at least ``min_visible_pixels`` visible pixels (what counts as
  a detectable object).
- ``meta``: plain-Python scene description.

The renderer knows no task: every task derives its ground truth from these buffers
(``Task.world_label``; :func:`must_ray.world.labels.render_labelled` renders scenes with the
labels of any registered task), so a new task needs no change here.
"""
from must_ray.world.render import MIN_VISIBLE_PIXELS, measure_render_speed, render_batch, render_scenes
from must_ray.world.scenes import CATEGORIES, DOMAINS, NUM_CATEGORIES, Scene, sample_scene

__all__ = [
    "CATEGORIES", "DOMAINS", "MIN_VISIBLE_PIXELS", "NUM_CATEGORIES", "Scene", "measure_render_speed",
    "render_batch", "render_scenes", "sample_scene",
]
