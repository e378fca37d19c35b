"""Experiments: one base pipeline config, arms that each change a few keys, one results table.

An experiment file (``jobs/configs/experiments/*.yaml``, :class:`ExperimentSpec`) names the base
config, the keys every arm shares (``set``) and the arms (each a mapping of dotted keys). The
**seed** run (the base config plus ``set``, under ``seed_root``) renders the world, trains the
teachers and pseudo-labels the pool once; experiments that agree on those share one seed. Each arm
is a whole pipeline run under ``<root>/<arm>`` that starts from a copy of the seed's outputs and
step markers, so the pipeline's own identities decide what an arm redoes: a student key retrains
the student, a label knob relabels, a pool size re-renders the pool (never a teacher). An arm
resumes like any pipeline run, and a finished one is skipped. The results
(``<root>/results/<name>.{json,md}``, and ``.png`` with ``x``) put each arm's student beside the
teachers on every task, with its transfer row and wall time.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from must_ray.config import Config, load_config
from must_ray.io import fmt_number, is_uri, md_table, write_atomic
from must_ray.label.store import OutputStore
from must_ray.pipeline import MARKER_DIR, read_marker, run_pipeline, steps
from must_ray.typed_config import ConfigError, build_dataclass

#: the steps the seed run does once for every arm
SEED_STEPS = ("world", "teachers", "label")
#: the outputs an arm copies from the seed (``paths.<name>``), and the store's manifest beside the labels
SEED_OUTPUTS = ("world", "teachers", "labels")
#: what the copies leave out: Ray Train's checkpoints of the teachers' runs (their models are kept)
NOT_COPIED = ("ray_train",)
SEEDED_MARKER = "seeded.json"


@dataclass
class ExperimentSpec:
    """One experiment file: ``config`` (the base pipeline config, relative to this file), ``set``
    (dotted keys every arm and the seed share), ``arms`` (name -> dotted keys of that arm),
    ``seed_root`` (where the shared world, teachers and labels live), ``root`` (the arms' runs and
    the results; default ``out/experiments/<name>``), ``x`` (a dotted key whose value in each arm
    is the x axis of ``<name>.png``), ``title`` (what it measures, one line)."""

    name: str
    config: str
    arms: dict[str, dict[str, Any]]
    seed_root: str
    set: dict[str, Any] = field(default_factory=dict)
    root: Optional[str] = None
    x: Optional[str] = None
    title: str = ""


def load_experiment(path: str) -> tuple[ExperimentSpec, str]:
    """The experiment file at ``path`` and its base config's path; a missing file, bad YAML, an
    unknown key or an experiment without arms raises ConfigError naming the key."""
    if not os.path.isfile(path):
        raise ConfigError(f"experiment file not found: {path}")
    try:
        data = yaml.safe_load(open(path).read())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with name, config, seed_root and arms")
    for key in ("name", "config", "seed_root", "arms"):
        if key not in data:
            raise ConfigError(f"{path}: {key}: missing (an experiment names its base config, seed_root and arms)")
    try:
        spec = build_dataclass(ExperimentSpec, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not spec.arms:
        raise ConfigError(f"{path}: arms: empty; give at least one arm (name: {{dotted.key: value}})")
    base = os.path.normpath(os.path.join(os.path.dirname(path), spec.config))
    if not os.path.isfile(base):
        raise ConfigError(f"{path}: config: base config not found: {base} (relative to the experiment file)")
    return spec, base


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def experiment_root(spec: ExperimentSpec) -> str:
    return spec.root or os.path.join("out", "experiments", spec.name)


def seed_config(spec: ExperimentSpec, base: str, extra: Sequence[str] = ()) -> Config:
    """The seed run's config: the base config, ``set``, ``extra``, under ``seed_root``."""
    return load_config(base, _overrides(spec.set) + list(extra) + [f"paths.root={spec.seed_root}"])


def arm_config(spec: ExperimentSpec, base: str, arm: str, extra: Sequence[str] = ()) -> Config:
    """Arm ``arm``'s config: the base config, ``set``, the arm's keys, ``extra``, under
    ``<root>/<arm>``; its world, teachers and labels must live under that root (they are copies)."""
    if arm not in spec.arms:
        raise ConfigError(f"--arm {arm}: no such arm; arms: {', '.join(spec.arms)}")
    cfg = load_config(base, _overrides(spec.set) + _overrides(spec.arms[arm]) + list(extra)
                      + [f"paths.root={os.path.join(experiment_root(spec), arm)}"])
    for name in SEED_OUTPUTS:
        value = getattr(cfg.paths, name)
        if is_uri(value) or os.path.isabs(value):
            raise ConfigError(f"arms.{arm}: paths.{name}={value!r}: an arm keeps its own copy of the seed's "
                              f"{name} under its root; make paths.{name} relative")
    return cfg


def _marker_names(root: str) -> list[str]:
    folder = os.path.join(root, MARKER_DIR)
    names = []
    for step in SEED_STEPS:
        names += [n for n in (f"{step}.json", f"{step}.started.json", step) if os.path.exists(os.path.join(folder, n))]
    return names


def seed_arm(seed: Config, arm: Config) -> bool:
    """Give ``arm``'s root a copy of the seed's world, teachers, labels (with the label store's
    manifest and quarantine beside them) and their step markers (once: an arm seeded before keeps
    its own state). A copy interrupted halfway is redone. Returns whether it copied."""
    folder = os.path.join(arm.paths.root, MARKER_DIR)
    if os.path.isfile(os.path.join(folder, SEEDED_MARKER)):
        return False
    sources = [(seed.paths.resolve(n), arm.paths.resolve(n)) for n in SEED_OUTPUTS]
    seed_labels, arm_labels = OutputStore(seed.paths.resolve("labels")), OutputStore(arm.paths.resolve("labels"))
    sources += [(seed_labels.manifest_dir, arm_labels.manifest_dir),
                (seed_labels.quarantine_dir, arm_labels.quarantine_dir)]
    for name in _marker_names(seed.paths.root):
        sources.append((os.path.join(seed.paths.root, MARKER_DIR, name), os.path.join(folder, name)))
    for src, dst in sources:
        if os.path.lexists(dst):
            shutil.rmtree(dst) if os.path.isdir(dst) and not os.path.islink(dst) else os.remove(dst)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*NOT_COPIED))
        elif os.path.isfile(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
    write_atomic(os.path.join(folder, SEEDED_MARKER), json.dumps({"seed_root": seed.paths.root, "at": time.time()}))
    return True


def arm_result(cfg: Config, seed_root: str) -> dict[str, Any]:
    """One finished arm's numbers: per task the student's and its teacher's metric and their ratio
    (``reports/metrics.json``), the student's transfer metric per task and the best teacher's
    (``reports/transfer.json``), and the wall time of each step the arm ran itself (not those it
    kept from the seed under ``seed_root``)."""
    reports = cfg.paths.resolve("reports")
    with open(os.path.join(reports, "metrics.json")) as f:
        metrics = json.load(f)
    tasks = {r["task"]: {k: r.get(k) for k in ("metric", "student", "teacher", "ratio", "pass", "higher_is_better")}
             for r in metrics.get("comparison", [])}
    transfer: dict[str, Any] = {}
    path = os.path.join(reports, "transfer.json")
    if os.path.isfile(path):
        with open(path) as f:
            t = json.load(f)
        rows = {r["backbone"]: r["metrics"] for r in t.get("rows", [])}
        for task in t.get("tasks", []):
            metric = t["columns"][task]
            better = max if t["higher_is_better"][task] else min
            teachers = [m[task][metric] for b, m in rows.items() if b.startswith("teacher_") and task in m]
            transfer[task] = {"metric": metric, "student": rows.get("student", {}).get(task, {}).get(metric),
                              "best_teacher": better(teachers) if teachers else None,
                              "higher_is_better": t["higher_is_better"][task]}
    wall = {}
    for step in steps(cfg.rounds):
        marker = read_marker(cfg.paths.root, step.name)
        if marker and marker.get("token") != (read_marker(seed_root, step.name) or {}).get("token"):
            wall[step.name] = marker.get("wall_s")
    return {"tasks": tasks, "transfer": transfer, "wall_s": wall}


def _dotted(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def write_results(spec: ExperimentSpec, results: dict[str, dict[str, Any]], out_dir: str) -> dict[str, str]:
    """``<name>.json``, ``<name>.md`` (and ``<name>.png`` when the experiment has an ``x``) of the
    finished arms under ``out_dir``: several experiments can share one root; returns the files."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"results_json": os.path.join(out_dir, f"{spec.name}.json"),
             "results_md": os.path.join(out_dir, f"{spec.name}.md")}
    write_atomic(files["results_json"], json.dumps({"experiment": spec.name, "title": spec.title, "x": spec.x,
                                                    "arms": results}, indent=1, sort_keys=True, default=str))
    write_atomic(files["results_md"], results_markdown(spec, results))
    if spec.x and any(r.get("x") is not None for r in results.values()):
        files["results_png"] = os.path.join(out_dir, f"{spec.name}.png")
        plot_results(spec, results, files["results_png"])
    return files


def _task_order(results: dict[str, dict[str, Any]], key: str) -> list[str]:
    return list(dict.fromkeys(t for r in results.values() for t in r.get(key, {})))


def results_markdown(spec: ExperimentSpec, results: dict[str, dict[str, Any]]) -> str:
    """Two tables: each arm's student / teacher on every task (the metric and the ratio), and each
    arm's student backbone on the transfer tasks beside the best teacher backbone; then wall times."""
    tasks = _task_order(results, "tasks")
    first = next(iter(results.values()))
    header = ["arm"] + [f"{t} {first['tasks'][t]['metric']} {'↑' if first['tasks'][t]['higher_is_better'] else '↓'}"
                        for t in tasks]
    rows = [[arm] + [f"{fmt_number(r['tasks'][t]['student'], 3)} ({fmt_number(r['tasks'][t]['ratio'], 3)}x)"
                     if t in r["tasks"] else "-" for t in tasks] for arm, r in results.items()]
    rows.append(["teacher"] + [fmt_number(first["tasks"][t]["teacher"], 3) for t in tasks])
    out = [f"# {spec.name}", "", spec.title, "", "Student on the test split (student / teacher in brackets):", "",
           md_table(header, rows), ""]
    transfer = _task_order(results, "transfer")
    if transfer:
        any_t = next(r for r in results.values() if r["transfer"])["transfer"]
        header = ["arm"] + [f"{t} {any_t[t]['metric']} {'↑' if any_t[t]['higher_is_better'] else '↓'}"
                            for t in transfer]
        rows = [[arm] + [fmt_number(r["transfer"].get(t, {}).get("student"), 3) for t in transfer]
                for arm, r in results.items()]
        rows.append(["best teacher"] + [fmt_number(any_t[t]["best_teacher"], 3) for t in transfer])
        out += ["Transfer (frozen backbone, ridge probes on the shifted domain):", "", md_table(header, rows), ""]
    steps = list(dict.fromkeys(s for r in results.values() for s in r["wall_s"]))
    rows = [[arm] + [_seconds(r["wall_s"].get(s)) for s in steps]
            + [_seconds(sum(v or 0 for v in r["wall_s"].values()))] for arm, r in results.items()]
    out += ["Wall time of the steps each arm ran itself, seconds (– = kept from the seed):", "",
            md_table(["arm"] + steps + ["total"], rows), ""]
    return "\n".join(out)


def _seconds(value: Any) -> str:
    return "–" if value is None else f"{float(value):.0f}"


def plot_results(spec: ExperimentSpec, results: dict[str, dict[str, Any]], path: str) -> None:
    """Student / teacher ratio per task against the arms' ``x`` values (log-2 axis when they are
    all positive numbers); one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    points = sorted(((r["x"], r) for r in results.values() if isinstance(r.get("x"), (int, float))),
                    key=lambda point: point[0])
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for task in _task_order(results, "tasks"):
        xs = [x for x, r in points if task in r["tasks"]]
        ys = [r["tasks"][task]["ratio"] for _, r in points if task in r["tasks"]]
        better = "↑" if points[0][1]["tasks"][task]["higher_is_better"] else "↓"
        ax.plot(xs, ys, marker="o", label=f"{task} ({better} better)")
    if points and all(x > 0 for x, _ in points):
        ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(spec.x)
    ax.set_ylabel("student / teacher")
    ax.set_title(spec.title or spec.name, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report_experiment(spec: ExperimentSpec, base: str, extra: Sequence[str] = ()
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The results of every finished arm, written under ``<root>/results/`` (nothing runs: no Ray
    needed); returns them and the files written."""
    results = {}
    for arm in spec.arms:
        cfg = arm_config(spec, base, arm, extra)
        if os.path.isfile(os.path.join(cfg.paths.resolve("reports"), "metrics.json")):
            results[arm] = {"set": spec.arms[arm], "x": _dotted(cfg, spec.x) if spec.x else None,
                            **arm_result(cfg, spec.seed_root)}
    files = write_results(spec, results, os.path.join(experiment_root(spec), "results")) if results else {}
    return results, files


def run_experiment(spec: ExperimentSpec, base: str, arms: Sequence[str] = (), extra: Sequence[str] = (),
                   progress_stream=None) -> dict[str, Any]:
    """Bring the seed up to date, then run every arm (or those named) as a pipeline of its own
    seeded from it, and write the results of every finished arm. Needs a connected Ray."""
    selected = list(arms) or list(spec.arms)
    seed = seed_config(spec, base, extra)
    configs = {arm: arm_config(spec, base, arm, extra) for arm in selected}
    t0 = time.time()
    seed_run = run_pipeline(seed, only=list(SEED_STEPS), progress_stream=progress_stream)
    runs = {}
    for i, (arm, cfg) in enumerate(configs.items()):
        copied = seed_arm(seed, cfg)
        print(f"[experiment {spec.name}] arm {i + 1}/{len(configs)} {arm}: {cfg.paths.root}"
              + (" (started from a copy of the seed)" if copied else ""), file=progress_stream or sys.stderr,
              flush=True)
        runs[arm] = run_pipeline(cfg, progress_stream=progress_stream)
    results, files = report_experiment(spec, base, extra)
    return {"seed": {"root": seed.paths.root, "ran": seed_run["ran"]},
            "arms": {a: {"ran": r["ran"], "skipped": r["skipped"]} for a, r in runs.items()},
            "results": results, "files": files, "wall_s": round(time.time() - t0, 1)}
