"""Ground truth of world scenes for any registered task: each task derives its label from the
raw render buffers (``Task.world_label``), so the world serves a task it has never heard of."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from must_ray.tasks import Task, build_tasks, default_task_names
from must_ray.world.render import render_scenes
from must_ray.world.scenes import NUM_CATEGORIES


def scene_labels(buffers: Mapping[str, Any], tasks: Mapping[str, Task]) -> dict[str, Any]:
    """``{task name: its label of the scene rendered as buffers}``."""
    return {name: task.world_label(buffers) for name, task in tasks.items()}


def render_labelled(seed: int, indices: Sequence[int], tasks: Optional[Sequence[str]] = None,
                    task_cfgs: Optional[Mapping[str, Any]] = None, **render_options: Any) -> list[dict[str, Any]]:
    """:func:`~must_ray.world.render.render_scenes` with each scene's buffers joined by the label of
    every task in ``tasks`` (default: every registered task) under the task's name."""
    objs = build_tasks(default_task_names() if tasks is None else tasks, NUM_CATEGORIES, task_cfgs)
    return [{**buffers, **scene_labels(buffers, objs)} for buffers in render_scenes(seed, indices, **render_options)]


__all__ = ["render_labelled", "scene_labels"]
