"""The MuST pipeline end to end: world -> teachers -> labels -> student -> evaluation -> transfer.

Each step calls the same library function its own job calls (``write_split``, ``train``,
``run_labeling``, ``run_evaluation``, ``run_transfer``): there is no second implementation.

Staleness: a step's **identity** is a hash of the config values it reads (:attr:`Step.reads`) and
the identities of the steps it needs, independent of the code. A finished step writes a marker
``<paths.root>/_pipeline/<step>.json`` holding its identity, the values it read, its summary, a
fresh run token and the tokens of the runs it consumed. On a rerun a step is skipped only when its
marker has the current identity, its outputs are still on disk and it consumed the current runs of
its inputs (:func:`plan_pipeline`). So a changed ``tasks.detection.score_threshold`` relabels and
retrains the student but keeps the teachers; a changed ``evaluate.*`` key reruns only the
evaluation; a crashed pipeline resumes at the step that did not finish (the labeller keeps its
committed shards, a training run resumes its checkpoints) because the identity it started with is
recorded; ``--force STEP`` reruns a step and everything downstream of it. Every skip and every
rerun says why.
"""
from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from must_ray.config import Config, TeacherConfig, teacher_config
from must_ray.evaluate.run import run_evaluation
from must_ray.evaluate.transfer import run_transfer, write_transfer
from must_ray.io import MODEL_FILE, is_uri, write_atomic
from must_ray.label.run import check_label_paths, label_tasks, run_labeling
from must_ray.label.teachers import default_teacher_path
from must_ray.progress import progress_tag
from must_ray.task_registry import get_task_class, registered_task_names
from must_ray.train.driver import train
from must_ray.typed_config import ConfigError, config_to_dict
from must_ray.world.splits import write_split


@dataclass
class Step:
    """One pipeline step: ``run(cfg) -> summary``; ``outputs(cfg)`` are the paths whose presence
    means the step's work exists; ``needs`` are the steps whose outputs it reads; ``reads(cfg)``
    the config values it reads (a JSON-ready mapping: its identity); ``fresh(cfg)`` the config to
    run with when earlier work under another identity must not be resumed; ``own_progress``: it
    draws its own progress line (else each of its Ray Data executions draws one)."""

    name: str
    title: str
    run: Callable[[Config], dict[str, Any]]
    outputs: Callable[[Config], list[str]]
    needs: tuple[str, ...] = ()
    reads: Callable[[Config], dict[str, Any]] = lambda cfg: {}
    fresh: Callable[[Config], Config] = lambda cfg: cfg
    own_progress: bool = False


def student_tasks(cfg: Config) -> list[str]:
    """Tasks of the run: the student's configured tasks, or every task that has a teacher."""
    return list(cfg.student.tasks or label_tasks(cfg))


def trained_teacher_tasks(cfg: Config) -> list[str]:
    """The tasks whose teacher the run trains, each on its own ``teacher_<task>`` split: every task
    of the run but the opt-in ones (``Task.opt_in``: ``features``), whose teacher the config names."""
    return [t for t in student_tasks(cfg) if not get_task_class(t).opt_in]


def student_model_path(cfg: Config) -> str:
    """The model file of ``cfg``'s student (of round 1, or of the round :func:`round_config` made)."""
    return os.path.join(cfg.paths.resolve("student"), MODEL_FILE)


def final_student_path(cfg: Config) -> str:
    """The model file of the last round's student: the one evaluation and transfer score."""
    return student_model_path(round_config(cfg, cfg.rounds))


def round_config(cfg: Config, r: int) -> Config:
    """The config of self-training round ``r`` (Noisy Student's loop). Round 1 is ``cfg``; from
    round 2 on, the previous round's student is the teacher of every task (through the same
    ``checkpoint`` teacher kind, one shared forward pass) and the round's labels and student get
    folders of their own (``<paths.labels>_r<r>``, ``<paths.student>_r<r>``; a named
    ``label.output`` or Ray Train ``run_name`` gets the same suffix). The student starts afresh."""
    if r <= 1:
        return cfg
    previous = student_model_path(round_config(cfg, r - 1))
    suffix = f"_r{r}"
    label = dataclasses.replace(
        cfg.label, teachers={t: TeacherConfig(kind="checkpoint", path=previous) for t in student_tasks(cfg)},
        output=cfg.label.output.rstrip("/") + suffix if cfg.label.output else None)
    checkpoint = cfg.student.checkpoint
    if checkpoint.run_name:
        checkpoint = dataclasses.replace(checkpoint, run_name=checkpoint.run_name + suffix)
    paths = dataclasses.replace(cfg.paths, labels=cfg.paths.labels.rstrip("/") + suffix,
                                student=cfg.paths.student.rstrip("/") + suffix)
    return dataclasses.replace(cfg, label=label, paths=paths,
                               student=dataclasses.replace(cfg.student, checkpoint=checkpoint))


def _world_splits(cfg: Config) -> list[str]:
    names = [f"teacher_{t}" for t in trained_teacher_tasks(cfg)] + ["test"]
    if not cfg.label.input:
        names.append("unlabeled")
    return names


def _split_path(cfg: Config, name: str) -> str:
    return os.path.join(cfg.paths.resolve("world"), name)


def split_reads(cfg: Config, name: str) -> dict[str, Any]:
    """What rendering split ``name`` reads: the world (less its other splits and speed knobs), the
    split's own config and its tasks' label encoding. Rendering is deterministic, so this is also
    the identity of the split's content."""
    split = cfg.world.splits[name]
    return {"world": _without(cfg.world, OPERATIONAL_KEYS["world"] + ("splits",)), "split": config_to_dict(split),
            "name": name, "task_modules": list(cfg.task_modules), "tasks": task_knobs(cfg, split.tasks, "world")}


def split_identity(cfg: Config, name: str) -> str:
    """The identity of split ``name``'s content (:func:`split_reads`; ``--force world`` renews it)."""
    return identity({"reads": reads_payload(split_reads, cfg, name), "forced": _force_nonce(cfg, "world")})


def run_world(cfg: Config) -> dict[str, Any]:
    """Render the splits the run needs (teacher_<task>, unlabeled, test). A split already on disk
    under the identity of its own config is kept: a changed pool size re-renders the pool only."""
    out: dict[str, Any] = {}
    for name in _world_splits(cfg):
        ident, path = split_identity(cfg, name), _split_path(cfg, name)
        marker = _read_marker(cfg, f"world/{name}") or {}
        if marker.get("identity") == ident and os.path.isdir(path):
            out[name] = {**marker.get("summary", {}), "skipped": "up to date"}
            continue
        s = write_split(cfg, name, path)
        out[name] = {"rows": s["rows"]}
        _write_marker(cfg, f"world/{name}", {"identity": ident, "summary": out[name]})
    return {"splits": out}


def teacher_identity(cfg: Config, task: str) -> str:
    """The identity of ``task``'s trained teacher: its recipe (:func:`teacher_reads`) and its own
    world split's content; ``--force teachers`` renews it."""
    split = f"teacher_{task}"
    return identity({"reads": reads_payload(teacher_reads, cfg, task), "forced": _force_nonce(cfg, "teachers"),
                     "split": split_identity(cfg, split) if split in cfg.world.splits else ""})


def run_teachers(cfg: Config) -> dict[str, Any]:
    """Train one specialised teacher per task on its own labelled split, ``teacher.concurrent_runs``
    at a time (independent Ray Train runs: on a 2-core laptop two one-thread teachers use both
    cores; on a cluster each run takes its own GPU workers). A teacher whose model exists under
    the current identity of its own recipe and its own world split is kept: one changed
    ``teacher.per_task.<task>`` retrains that teacher only, and a re-rendered world retrains only
    the teachers whose own split changed."""
    def one(task: str) -> tuple[str, dict[str, Any]]:
        ident = teacher_identity(cfg, task)
        marker = _read_marker(cfg, f"teachers/{task}") or {}
        if os.path.isfile(default_teacher_path(cfg, task)) and marker.get("identity") == ident:
            return task, {**marker.get("summary", {}), "skipped": "up to date"}
        tcfg = teacher_config(cfg, task)
        data = list(tcfg.teacher.data) or [_split_path(cfg, f"teacher_{task}")]
        run_name = tcfg.teacher.checkpoint.run_name or f"{cfg.name}-teacher-{task}-{ident[:8]}"
        s = train(cfg, "teacher", data=data, tasks=[task], out_dir=os.path.dirname(default_teacher_path(cfg, task)),
                  run_name=run_name)
        summary = {"model": s["model"], "steps": s["steps"], "loss": s["loss"], "wall_s": s["wall_s"]}
        _write_marker(cfg, f"teachers/{task}", {"identity": ident, "summary": summary})
        return task, summary

    tasks = trained_teacher_tasks(cfg)
    with ThreadPoolExecutor(max(1, min(cfg.teacher.concurrent_runs, len(tasks)))) as pool:
        # each run in the step's context: its progress tag (the training runs draw their own lines)
        return dict(pool.map(lambda task: contextvars.copy_context().run(one, task), tasks))


def run_label(cfg: Config) -> dict[str, Any]:
    """Pseudo-label the unlabelled pool with every teacher (Ray Data actors -> Parquet)."""
    s = run_labeling(cfg)
    return {k: s.get(k) for k in ("output", "rows", "quarantined", "images_per_s", "wall_s")}


def run_student(cfg: Config, step: str = "student", label_step: str = "label") -> dict[str, Any]:
    """Train the multi-task student on the pseudo labels (plus any configured real-label tables);
    ``step`` / ``label_step``: this step's and its labels' step names (a later round's)."""
    data = [cfg.paths.resolve("labels")] + list(cfg.student.data)
    # The Ray Train run is named after the labels it learns from and its own recipe: new pseudo
    # labels or a changed recipe start a fresh run, a rerun of the same resumes (or re-exports) it.
    label_token = (_read_marker(cfg, label_step) or {}).get("token", "")
    ident = identity({"reads": reads_payload(student_reads, cfg), "labels": label_token,
                      "forced": _force_nonce(cfg, step)})
    run_name = cfg.student.checkpoint.run_name or f"{cfg.name}-student-{ident[:8]}"
    s = train(cfg, "student", data=data, tasks=student_tasks(cfg), out_dir=cfg.paths.resolve("student"),
              run_name=run_name)
    return {"model": s["model"], "steps": s["steps"], "loss": s["loss"], "images_per_s": s["images_per_s"],
            "wall_s": s["wall_s"]}


def run_evaluate(cfg: Config) -> dict[str, Any]:
    """Score student and teachers on the test split; comparison table and pictures."""
    teachers = {t: default_teacher_path(cfg, t) for t in trained_teacher_tasks(cfg)}
    return run_evaluation(cfg, student=final_student_path(cfg), teachers=teachers,
                          data=[_split_path(cfg, "test")], out_dir=cfg.paths.resolve("reports"))


def run_transfer_step(cfg: Config) -> dict[str, Any]:
    """Frozen-backbone probes on a shifted domain: student vs each teacher vs random init."""
    backbones = {"student": final_student_path(cfg)}
    backbones.update({f"teacher_{t}": default_teacher_path(cfg, t) for t in trained_teacher_tasks(cfg)})
    result = run_transfer(cfg, backbones)
    files = write_transfer(cfg.paths.resolve("reports"), result)
    return {"files": files, "table": result.get("table", result.get("rows"))}


# Config keys that change how fast or where a step runs, never what it produces.
OPERATIONAL_KEYS = {
    "train": ("concurrent_runs", "per_task", "checkpoint", "report_every_steps", "input.prefetch_batches",
              "input.read_cpus", "input.cache_max_mb"),
    "label": ("output", "actors", "num_cpus_per_actor", "num_gpus_per_actor", "decode_num_cpus", "torch_threads",
              "encode_threads", "overwrite", "batch_size"),
    "evaluate": ("use_ray", "actors", "num_cpus_per_actor", "num_gpus_per_actor", "read_cpus", "batch_size"),
    "world": ("render_batch", "rows_per_file"),
}


def _without(section: Any, keys: Sequence[str]) -> dict[str, Any]:
    out = config_to_dict(section)
    for dotted in keys:
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def task_knobs(cfg: Config, tasks: Sequence[str], role: str) -> dict[str, Any]:
    """The ``tasks.<task>`` knobs a step of ``role`` reads: ``label`` and ``evaluate`` read all of
    them; ``train`` (teachers, student) all but the teacher post-processing knobs a task's config
    class names in ``postprocess_knobs``; ``world`` also not ``loss_weight``."""
    out = {}
    for task in tasks:
        if task not in cfg.tasks:
            continue
        knobs = config_to_dict(cfg.tasks[task])
        if role in ("train", "world"):
            for key in getattr(type(cfg.tasks[task]), "postprocess_knobs", ()):
                knobs.pop(key, None)
        if role == "world":
            knobs.pop("loss_weight", None)
        out[task] = knobs
    return out


def world_reads(cfg: Config) -> dict[str, Any]:
    """What the world step reads: the world, the splits the run needs, the tasks' label encoding."""
    return {"world": _without(cfg.world, OPERATIONAL_KEYS["world"]), "splits": _world_splits(cfg),
            "task_modules": list(cfg.task_modules), "tasks": task_knobs(cfg, trained_teacher_tasks(cfg), "world")}


def teacher_reads(cfg: Config, task: str) -> dict[str, Any]:
    """What training ``task``'s teacher reads: its recipe (``teacher`` merged with
    ``teacher.per_task.<task>``) and the task's training knobs."""
    return {"task": task, "teacher": _without(teacher_config(cfg, task).teacher, OPERATIONAL_KEYS["train"]),
            "tasks": task_knobs(cfg, [task], "train")}


def teachers_reads(cfg: Config) -> dict[str, Any]:
    """What the teachers step reads: every teacher's :func:`teacher_reads`."""
    return {task: teacher_reads(cfg, task) for task in trained_teacher_tasks(cfg)}


def label_reads(cfg: Config) -> dict[str, Any]:
    """What the labelling step reads: ``label`` (less its speed knobs) and its tasks' knobs."""
    return {"label": _without(cfg.label, OPERATIONAL_KEYS["label"]),
            "tasks": task_knobs(cfg, label_tasks(cfg), "label"), "image_size": cfg.world.image_size}


def student_reads(cfg: Config) -> dict[str, Any]:
    """What training the student reads: its recipe and its tasks' training knobs."""
    return {"student": _without(cfg.student, OPERATIONAL_KEYS["train"]), "tasks_run": student_tasks(cfg),
            "tasks": task_knobs(cfg, student_tasks(cfg), "train")}


def evaluate_reads(cfg: Config) -> dict[str, Any]:
    """What the evaluation reads: ``evaluate`` (less its speed knobs) and every task's knobs."""
    return {"evaluate": _without(cfg.evaluate, OPERATIONAL_KEYS["evaluate"]),
            "tasks": task_knobs(cfg, student_tasks(cfg), "evaluate")}


def transfer_reads(cfg: Config) -> dict[str, Any]:
    """What the transfer probes read: ``transfer``, the world they render its splits from, the tasks."""
    return {"transfer": _without(cfg.transfer, ("cache_dir",)), "world": _without(cfg.world, OPERATIONAL_KEYS["world"]),
            "tasks": task_knobs(cfg, student_tasks(cfg), "evaluate")}


def _label_afresh(cfg: Config) -> Config:
    return dataclasses.replace(cfg, label=dataclasses.replace(cfg.label, overwrite=True))


def round_steps(rounds: int) -> list[Step]:
    """The steps of self-training rounds 2..``rounds``: relabel the pool with the previous round's
    student (``label_r<r>``), train a fresh student on those labels (``student_r<r>``)."""
    out = []
    for r in range(2, rounds + 1):
        previous = "student" if r == 2 else f"student_r{r - 1}"
        out += [
            Step(f"label_r{r}", f"relabel the pool with the round-{r - 1} student",
                 lambda c, r=r: run_label(round_config(c, r)),
                 lambda c, r=r: [round_config(c, r).paths.resolve("labels")], (previous,),
                 reads=lambda c, r=r: label_reads(round_config(c, r)), fresh=_label_afresh, own_progress=True),
            Step(f"student_r{r}", f"train the round-{r} student", lambda c, r=r: run_student(
                     round_config(c, r), f"student_r{r}", f"label_r{r}"),
                 lambda c, r=r: [student_model_path(round_config(c, r))], (f"label_r{r}",),
                 reads=lambda c, r=r: student_reads(round_config(c, r)), own_progress=True),
        ]
    return out


def steps(rounds: int = 1) -> list[Step]:
    """The pipeline's steps, in order; ``rounds`` > 1 adds the later self-training rounds
    (:func:`round_steps`) before the evaluation, which scores the last round's student."""
    last = "student" if rounds <= 1 else f"student_r{rounds}"
    return [
        Step("world", "render the synthetic world", run_world,
             lambda c: [_split_path(c, n) for n in _world_splits(c)], reads=world_reads),
        Step("teachers", "train one teacher per task", run_teachers,
             lambda c: [default_teacher_path(c, t) for t in trained_teacher_tasks(c)], ("world",), reads=teachers_reads,
             own_progress=True),
        Step("label", "pseudo-label the pool with every teacher", run_label,
             lambda c: [c.paths.resolve("labels")], ("world", "teachers"), reads=label_reads, fresh=_label_afresh,
             own_progress=True),
        Step("student", "train the multi-task student", run_student,
             lambda c: [student_model_path(c)], ("label",), reads=student_reads, own_progress=True),
        *round_steps(rounds),
        Step("evaluate", "evaluate student vs teachers", run_evaluate,
             lambda c: [os.path.join(c.paths.resolve("reports"), "metrics.json")], ("world", "teachers", last),
             reads=evaluate_reads),
        Step("transfer", "transfer probes on a shifted domain", run_transfer_step,
             lambda c: [os.path.join(c.paths.resolve("reports"), "transfer.json")], ("teachers", last),
             reads=transfer_reads),
    ]


_DEFAULTS: dict[tuple[str, ...], Config] = {}


def reads_payload(reads: Callable[..., dict[str, Any]], cfg: Config, *args: Any) -> dict[str, Any]:
    """What an identity hashes of ``reads(cfg, *args)``: its values (flattened to dotted keys) that
    differ from the same reads of the built-in defaults. So a key a newer must-ray adds, at its
    default (new knobs default to the old behaviour), leaves every identity as it was, and an
    upgrade does not redo finished work; a value set away from its default changes it."""
    tasks = registered_task_names()  # the defaults of the tasks registered now (task_modules add some)
    if tasks not in _DEFAULTS:
        _DEFAULTS[tasks] = Config()
    mine = _flatten(json.loads(json.dumps(reads(cfg, *args), default=str)))
    try:
        base = _flatten(json.loads(json.dumps(reads(_DEFAULTS[tasks], *args), default=str)))
    except (KeyError, ConfigError):
        base = {}
    return {key: value for key, value in mine.items() if key not in base or base[key] != value}


def identity(payload: Any) -> str:
    """A short stable hash of a JSON-ready value (a step's reads and its inputs' identities)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def step_identities(cfg: Config, pipeline: Sequence[Step]) -> dict[str, str]:
    """Every step's identity under ``cfg``: a hash of what it reads and of its inputs' identities.
    A pure function of the config (no files are read)."""
    out: dict[str, str] = {}
    for step in pipeline:
        out[step.name] = identity({"step": step.name, "reads": reads_payload(step.reads, cfg),
                                   "inputs": {n: out.get(n) for n in step.needs}})
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def changed_keys(before: dict[str, Any], after: dict[str, Any], limit: int = 3) -> str:
    """``"a.b 0.3 -> 0.5, c (new)"``: the values that differ between two ``reads`` mappings."""
    old = _flatten(json.loads(json.dumps(before, default=str)))
    new = _flatten(json.loads(json.dumps(after, default=str)))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            diffs.append(f"{key} (new)")
        elif key not in new:
            diffs.append(f"{key} (gone)")
        elif old[key] != new[key]:
            diffs.append(f"{key} {json.dumps(old[key])} -> {json.dumps(new[key])}")
    more = f", +{len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


@dataclass
class Decision:
    """What :func:`plan_pipeline` decided for one step, and why (shown on its progress line)."""

    step: Step
    identity: str
    run: bool
    reason: str


def plan_pipeline(cfg: Config, pipeline: Sequence[Step], force: Sequence[str] = ()) -> list[Decision]:
    """For every step: run it or skip it, with the reason. A step runs when it is forced
    (``--force``), never finished, finished under another identity (the config values it reads
    changed: the reason names them), lost an output, or an input step runs or ran since; else
    it is up to date and skipped."""
    idents = step_identities(cfg, pipeline)
    runs: set[str] = set()
    out = []
    for step in pipeline:
        marker = _read_marker(cfg, step.name)
        missing = [p for p in step.outputs(cfg) if not os.path.exists(p)]
        rerun_inputs = [n for n in step.needs if n in runs]
        moved_inputs = [n for n in step.needs if marker is not None and n not in rerun_inputs
                        and marker.get("inputs", {}).get(n) != (_read_marker(cfg, n) or {}).get("token")]
        if step.name in force:
            reason = "forced (--force)"
        elif marker is None:
            reason = "not run yet"
        elif "identity" not in marker:
            reason = "finished by an older must-ray that recorded no identity"
        elif marker["identity"] != idents[step.name]:
            diff = changed_keys(marker.get("reads", {}), step.reads(cfg))
            reason = f"config changed: {diff}" if diff else \
                f"input {', '.join(rerun_inputs)} reruns" if rerun_inputs else "its inputs' config changed"
        elif rerun_inputs:
            reason = f"input {', '.join(rerun_inputs)} reruns"
        elif moved_inputs:
            reason = f"input {', '.join(moved_inputs)} was rerun since"
        elif missing:
            reason = f"output missing: {missing[0]}"
        else:
            out.append(Decision(step, idents[step.name], False, "up to date (same config values and inputs)"))
            continue
        runs.add(step.name)
        out.append(Decision(step, idents[step.name], True, reason))
    return out


class Progress:
    """A one-screen view of the pipeline: every step with its state, time and reason, redrawn (to
    stderr) whenever a step starts or ends."""
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


#: the folder under ``paths.root`` that holds the steps' markers
MARKER_DIR = "_pipeline"


def _marker_path(cfg: Config, name: str) -> str:
    return os.path.join(cfg.paths.root, MARKER_DIR, f"{name}.json")


def _read_marker(cfg: Config, name: str) -> Optional[dict]:
    return read_marker(cfg.paths.root, name)


def read_marker(root: str, name: str) -> Optional[dict]:
    """The marker of step ``name`` of the run under ``root`` (``None``: not finished, or unreadable)."""
    path = os.path.join(root, MARKER_DIR, f"{name}.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _force_nonce(cfg: Config, name: str) -> str:
    """A value that changes each time ``--force name`` runs the step (and only then), so work the
    step would otherwise keep or resume (a finished teacher, a Ray Train run) is redone."""
    return (_read_marker(cfg, f"{name}.started") or {}).get("force_nonce", "")


def _write_marker(cfg: Config, name: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(_marker_path(cfg, name)), exist_ok=True)
    write_atomic(_marker_path(cfg, name), json.dumps(payload, indent=1, sort_keys=True, default=str))


def plan_request(cfg: Config, only: Optional[Sequence[str]] = None, pipeline: Optional[list[Step]] = None,
                 force: Sequence[str] = ()) -> list[Decision]:
    """The decisions of :func:`plan_pipeline` for the steps ``only`` selects; raises
    ConfigError for an unknown step name, an out-of-date input step outside ``only``, or a
    ``paths.root`` that is a URI (the big outputs can be: ``paths.labels``, the checkpoints). Needs
    no Ray, so a job checks its request before starting it."""
    if is_uri(cfg.paths.root):
        raise ConfigError(
            f"paths.root={cfg.paths.root!r}: the pipeline keeps its world, models, step markers and reports "
            f"under paths.root with local file calls, so it must be a path (a mount every node shares on a "
            f"cluster); put the big outputs on object storage with --set paths.labels=s3://... and "
            f"--set teacher.checkpoint.storage_path=s3://... --set student.checkpoint.storage_path=s3://...")
    all_steps = pipeline if pipeline is not None else steps(cfg.rounds)
    names = [s.name for s in all_steps]
    for flag, given in (("--only", only or []), ("--force", force)):
        for n in given:
            if n not in names:
                raise ConfigError(f"{flag} {n}: unknown step; steps: {', '.join(names)}")
    decisions = plan_pipeline(cfg, all_steps, force)
    if not only:
        return decisions
    by_name = {d.step.name: d for d in decisions}
    for d in decisions:
        if d.step.name not in only:
            continue
        for need in d.step.needs:
            if need not in only and by_name[need].run:
                raise ConfigError(f"--only {d.step.name}: its input step {need} is out of date "
                                  f"({by_name[need].reason}); add --only {need} or run without --only")
    return [d for d in decisions if d.step.name in only]


def run_pipeline(cfg: Config, only: Optional[list[str]] = None, pipeline: Optional[list[Step]] = None,
                 progress_stream=None, force: Sequence[str] = ()) -> dict[str, Any]:
    """Run every step of ``pipeline`` (default: :func:`steps`) that :func:`plan_pipeline` does
    not find up to date; ``only`` limits the steps (an input step outside ``only`` must be up to
    date), ``force`` reruns steps and their dependents. Needs a connected Ray for the real steps.
    Returns a summary of every step and why each ran or was skipped."""
    decisions = plan_request(cfg, only, pipeline, force)
    if any(d.run and d.step.name == "label" for d in decisions):
        check_label_paths(cfg)  # a bad label input or output fails before the steps before it
    progress = Progress(cfg, [d.step.name for d in decisions], progress_stream)
    summary: dict[str, Any] = {"steps": {}, "ran": [], "skipped": [], "reasons": {}}
    for d in decisions:
        step = d.step
        summary["reasons"][step.name] = d.reason
        if not d.run:
            summary["skipped"].append(step.name)
            summary["steps"][step.name] = (_read_marker(cfg, step.name) or {}).get("summary")
            progress.set(step.name, "skipped", f"{d.reason}; --force {step.name} reruns it")
            continue
        started = _read_marker(cfg, f"{step.name}.started") or {}
        forced = step.name in force
        resume = started.get("identity") == d.identity and not forced
        _write_marker(cfg, f"{step.name}.started", {
            "identity": d.identity, "at": time.time(),
            "force_nonce": uuid.uuid4().hex if forced else started.get("force_nonce", "")})
        progress.set(step.name, "running", f"{step.title} ({d.reason}) ...")
        t0 = time.time()
        try:
            with progress_tag(step.name, ray_data=not step.own_progress):
                result = step.run(cfg if resume else step.fresh(cfg))
        except BaseException:
            progress.set(step.name, "failed", f"after {time.time() - t0:.0f}s")
            raise
        elapsed = time.time() - t0
        inputs = {need: (_read_marker(cfg, need) or {}).get("token") for need in step.needs}
        _write_marker(cfg, step.name, {"token": uuid.uuid4().hex, "identity": d.identity,
                                       "reads": step.reads(cfg), "inputs": inputs, "summary": result,
                                       "wall_s": round(elapsed, 2), "finished_at": time.time()})
        summary["ran"].append(step.name)
        summary["steps"][step.name] = result
        progress.set(step.name, "done", f"{elapsed:.0f}s ({d.reason})")
    return summary
