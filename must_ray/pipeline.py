"""The MuST pipeline end to end: world -> teachers -> labels -> student -> evaluation -> transfer.

Each step calls the same library function its own job calls (``write_split``, ``train``,
``run_labeling``, ``run_evaluation``, ``run_transfer``): there is no second implementation.

Resumability: a finished step writes a marker ``<paths.root>/_pipeline/<step>.json`` holding its
summary, a fresh token, and the tokens of the steps it consumed. On a rerun a step is skipped when
its marker exists, its outputs are still on disk, and its inputs are the very outputs it consumed
(same upstream tokens). So a crashed pipeline resumes at the step that did not finish, a finished
pipeline reruns nothing, and deleting one step's output redoes that step plus the steps that read
it (evaluation and transfer after the student), never the expensive upstream ones.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

from must_ray.config import Config, teacher_config
from must_ray.evaluate.run import run_evaluation
from must_ray.evaluate.transfer import run_transfer, write_transfer
from must_ray.io import MODEL_FILE, write_atomic
from must_ray.label.run import label_tasks, run_labeling
from must_ray.label.teachers import default_teacher_path
from must_ray.train.driver import train
from must_ray.typed_config import ConfigError
from must_ray.world.splits import write_split


@dataclass
class Step:
    """One pipeline step: ``run(cfg) -> summary``; ``outputs(cfg)`` are the paths whose presence
    means the step's work exists; ``needs`` are the steps whose outputs it reads."""

    name: str
    title: str
    run: Callable[[Config], dict[str, Any]]
    outputs: Callable[[Config], list[str]]
    needs: tuple[str, ...] = ()


def student_tasks(cfg: Config) -> list[str]:
    """Tasks of the run: the student's configured tasks, or every task that has a teacher."""
    return list(cfg.student.tasks or label_tasks(cfg))


def student_model_path(cfg: Config) -> str:
    return os.path.join(cfg.paths.resolve("student"), MODEL_FILE)


def _world_splits(cfg: Config) -> list[str]:
    names = [f"teacher_{t}" for t in student_tasks(cfg)] + ["test"]
    if not cfg.label.input:
        names.append("unlabeled")
    return names


def _split_path(cfg: Config, name: str) -> str:
    return os.path.join(cfg.paths.resolve("world"), name)


def run_world(cfg: Config) -> dict[str, Any]:
    """Render the splits the run needs (teacher_<task>, unlabeled, test)."""
    out = [write_split(cfg, name, _split_path(cfg, name)) for name in _world_splits(cfg)]
    return {"splits": {s["split"]: s["rows"] for s in out}}


def run_teachers(cfg: Config) -> dict[str, Any]:
    """Train one specialised teacher per task on its own labelled split, ``teacher.concurrent_runs``
    at a time (independent Ray Train runs: on a 2-core laptop two one-thread teachers use both
    cores; on a cluster each run takes its own GPU workers)."""
    def one(task: str) -> tuple[str, dict[str, Any]]:
        if os.path.isfile(default_teacher_path(cfg, task)):
            return task, {"model": default_teacher_path(cfg, task), "skipped": True}
        data = list(teacher_config(cfg, task).teacher.data) or [_split_path(cfg, f"teacher_{task}")]
        s = train(cfg, "teacher", data=data, tasks=[task], out_dir=os.path.dirname(default_teacher_path(cfg, task)))
        return task, {"model": s["model"], "steps": s["steps"], "loss": s["loss"], "wall_s": s["wall_s"]}

    tasks = student_tasks(cfg)
    with ThreadPoolExecutor(max(1, min(cfg.teacher.concurrent_runs, len(tasks)))) as pool:
        return dict(pool.map(one, tasks))


def run_label(cfg: Config) -> dict[str, Any]:
    """Pseudo-label the unlabelled pool with every teacher (Ray Data actors -> Parquet)."""
    s = run_labeling(cfg)
    return {k: s.get(k) for k in ("output", "rows", "quarantined", "images_per_s", "wall_s")}


def run_student(cfg: Config) -> dict[str, Any]:
    """Train the multi-task student on the pseudo labels (plus any configured real-label tables)."""
    data = [cfg.paths.resolve("labels")] + list(cfg.student.data)
    # The Ray Train run is named after the labels it learns from: new pseudo labels start a fresh
    # run, while a rerun on the same labels resumes (or re-exports) the existing one.
    label_token = (_read_marker(cfg, "label") or {}).get("token", "")[:8]
    run_name = cfg.student.checkpoint.run_name or f"{cfg.name}-student-{label_token or 'labels'}"
    s = train(cfg, "student", data=data, tasks=student_tasks(cfg), out_dir=cfg.paths.resolve("student"),
              run_name=run_name)
    return {"model": s["model"], "steps": s["steps"], "loss": s["loss"], "images_per_s": s["images_per_s"],
            "wall_s": s["wall_s"]}


def run_evaluate(cfg: Config) -> dict[str, Any]:
    """Score student and teachers on the test split; comparison table and pictures."""
    teachers = {t: default_teacher_path(cfg, t) for t in student_tasks(cfg)}
    return run_evaluation(cfg, student=student_model_path(cfg), teachers=teachers,
                          data=[_split_path(cfg, "test")], out_dir=cfg.paths.resolve("reports"))


def run_transfer_step(cfg: Config) -> dict[str, Any]:
    """Frozen-backbone probes on a shifted domain: student vs each teacher vs random init."""
    backbones = {"student": student_model_path(cfg)}
    backbones.update({f"teacher_{t}": default_teacher_path(cfg, t) for t in student_tasks(cfg)})
    result = run_transfer(cfg, backbones)
    files = write_transfer(cfg.paths.resolve("reports"), result)
    return {"files": files, "table": result.get("table", result.get("rows"))}


def steps() -> list[Step]:
    """The pipeline's steps, in order."""
    return [
        Step("world", "render the synthetic world", run_world,
             lambda c: [_split_path(c, n) for n in _world_splits(c)]),
        Step("teachers", "train one teacher per task", run_teachers,
             lambda c: [default_teacher_path(c, t) for t in student_tasks(c)], ("world",)),
        Step("label", "pseudo-label the pool with every teacher", run_label,
             lambda c: [c.paths.resolve("labels")], ("world", "teachers")),
        Step("student", "train the multi-task student", run_student,
             lambda c: [student_model_path(c)], ("label",)),
        Step("evaluate", "evaluate student vs teachers", run_evaluate,
             lambda c: [os.path.join(c.paths.resolve("reports"), "metrics.json")], ("teachers", "student")),
        Step("transfer", "transfer probes on a shifted domain", run_transfer_step,
             lambda c: [os.path.join(c.paths.resolve("reports"), "transfer.json")], ("teachers", "student")),
    ]


class Progress:
    """A one-screen view of the pipeline: every step with its state and time, redrawn (to stderr)
    whenever a step starts or ends."""
    def __init__(self, cfg: Config, names: list[str], stream=None):
        self.cfg = cfg
        self.state = {n: ("pending", "") for n in names}
        self.stream = stream or sys.stderr

    def set(self, name: str, state: str, note: str = "") -> None:
        self.state[name] = (state, note)
        self.draw()

    def draw(self) -> None:
        marks = {"pending": "[    ]", "running": "[ >> ]", "done": "[done]", "skipped": "[skip]", "failed": "[FAIL]"}
        lines = [f"must-ray pipeline '{self.cfg.name}' -> {self.cfg.paths.root}"]
        for name, (state, note) in self.state.items():
            lines.append(f"  {marks[state]} {name:<9} {note}")
        print("\n".join(lines), file=self.stream, flush=True)


def _marker_path(cfg: Config, name: str) -> str:
    return os.path.join(cfg.paths.root, "_pipeline", f"{name}.json")


def _read_marker(cfg: Config, name: str) -> Optional[dict]:
    path = _marker_path(cfg, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_marker(cfg: Config, name: str, payload: dict) -> None:
    write_atomic(_marker_path(cfg, name), json.dumps(payload, indent=1, sort_keys=True, default=str))


def step_is_current(cfg: Config, step: Step) -> bool:
    """True when ``step`` finished before, its outputs exist, and it consumed the current outputs
    of the steps it needs."""
    marker = _read_marker(cfg, step.name)
    if marker is None or not all(os.path.exists(p) for p in step.outputs(cfg)):
        return False
    for need in step.needs:
        upstream = _read_marker(cfg, need)
        if upstream is None or marker.get("inputs", {}).get(need) != upstream.get("token"):
            return False
    return True


def run_pipeline(cfg: Config, only: Optional[list[str]] = None, pipeline: Optional[list[Step]] = None,
                 progress_stream=None) -> dict[str, Any]:
    """Run every step of ``pipeline`` (default: :func:`steps`) that is not current (see the module
    docstring); ``only`` limits the steps. Needs a connected Ray. Returns a summary of every step."""
    all_steps = pipeline if pipeline is not None else steps()
    names = [s.name for s in all_steps]
    for n in only or []:
        if n not in names:

            raise ConfigError(f"--only {n}: unknown step; steps: {', '.join(names)}")
    selected = [s for s in all_steps if not only or s.name in only]
    progress = Progress(cfg, [s.name for s in selected], progress_stream)
    summary: dict[str, Any] = {"steps": {}, "ran": [], "skipped": []}
    for step in selected:
        if step_is_current(cfg, step):
            summary["skipped"].append(step.name)
            summary["steps"][step.name] = (_read_marker(cfg, step.name) or {}).get("summary")
            progress.set(step.name, "skipped", "(outputs exist)")
            continue
        progress.set(step.name, "running", step.title + " ...")
        t0 = time.time()
        try:
            result = step.run(cfg)
        except BaseException:
            progress.set(step.name, "failed", f"after {time.time() - t0:.0f}s")
            raise
        elapsed = time.time() - t0
        inputs = {need: (_read_marker(cfg, need) or {}).get("token") for need in step.needs}
        _write_marker(cfg, step.name, {"token": uuid.uuid4().hex, "inputs": inputs, "summary": result,
                                       "wall_s": round(elapsed, 2), "finished_at": time.time()})
        summary["ran"].append(step.name)
        summary["steps"][step.name] = result
        progress.set(step.name, "done", f"{elapsed:.0f}s")
    return summary
