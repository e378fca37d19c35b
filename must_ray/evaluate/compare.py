
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

from must_ray.io import METRICS_JSON, METRICS_MD, dumps_strict, fmt_number, md_table, strict_json, write_atomic
from must_ray.tasks import get_task_class, registered_task_names

DEFAULT_TOLERANCE = 0.02


def beats(value: float, baseline: float, higher_is_better: bool) -> bool:
    """Strictly better than ``baseline`` in the metric's direction (NaN never beats anything)."""
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline):
        return False
    return value > baseline if higher_is_better else value < baseline


def _task_entry(result: Mapping[str, Any], task: str) -> Optional[Mapping[str, Any]]:
    tasks = result.get("tasks", result) if isinstance(result, Mapping) else {}
    entry = tasks.get(task) if isinstance(tasks, Mapping) else None
    return entry if isinstance(entry, Mapping) else None


def _num(v: Any) -> float:
    """A metric value as a float (``None`` -- a non-finite value after strict JSON -- is NaN)."""
    return float("nan") if v is None else float(v)


def passes(student: float, teacher: float, higher_is_better: bool, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """MuST's criterion: ``student >= (1 - tol) * teacher`` (higher is better) or
    ``student <= (1 + tol) * teacher`` (lower is better). NaN fails; an infinite student error
    fails; an infinite teacher error is beaten by any finite student error."""
    if math.isnan(student) or math.isnan(teacher):
        return False
    if higher_is_better:
        return student >= (1.0 - tolerance) * teacher
    if math.isinf(student) and student > 0:
        return False  # an infinite error (nothing scored) never passes
    return student <= (1.0 + tolerance) * teacher


def compare(student_metrics: Mapping[str, Any], teacher_metrics: Mapping[str, Mapping[str, Any]],
            tolerance: float = DEFAULT_TOLERANCE) -> list[dict[str, Any]]:
    """Student vs teachers, one row per task in ``teacher_metrics`` (``{task: that task's teacher's
    evaluate_model result}``; bare ``{task: entry}`` maps work too). Each row: ``task``, ``metric``,
    ``higher_is_better``, ``direction`` (``higher``/``lower``), ``student``, ``teacher``, ``ratio``
    (student / teacher; ``None`` when undefined), ``criterion`` (text), ``trivial`` (the student
    table's trivial baseline), ``student_beats_trivial``, ``pass`` (bool). A task the student or
    teacher was not scored on fails with a ``note``."""
    rows = []
    for task in [t for t in registered_task_names() if t in teacher_metrics] + \
            sorted(t for t in teacher_metrics if t not in registered_task_names()):
        s, t = _task_entry(student_metrics, task), _task_entry(teacher_metrics[task], task)
        ref = s or t or {}
        hib = bool(ref.get("higher_is_better", True))
        factor = (1.0 - tolerance) if hib else (1.0 + tolerance)
        row: dict[str, Any] = {
            "task": task, "metric": ref.get("primary_metric"), "higher_is_better": hib,
            "direction": "higher" if hib else "lower",
            "criterion": f"{'>=' if hib else '<='} {factor:.2f} x teacher",
            "student": None, "teacher": None, "ratio": None, "trivial": None, "student_beats_trivial": None,
            "pass": False,
        }
        if s is None or t is None:
            row["note"] = f"{'student' if s is None else 'teacher'} was not scored on {task}"
            rows.append(row)
            continue
        sv, tv = _num(s["value"]), _num(t["value"])
        row.update(student=sv, teacher=tv, trivial=_num(s.get("trivial_value")),
                   student_beats_trivial=bool(s.get("beats_trivial")),
                   ratio=(sv / tv if tv != 0 and math.isfinite(tv) and math.isfinite(sv) else None),
                   **{"pass": passes(sv, tv, hib, tolerance)})
        rows.append(row)
    return rows


def comparison_passed(rows: Sequence[Mapping[str, Any]]) -> bool:
    """True when every compared task passes (and there is at least one)."""
    return bool(rows) and all(r["pass"] for r in rows)


def metric_unit(task: str, metric: str) -> str:
    """The unit of ``task``'s ``metric`` as its task declares it (``Task.metric_units``; "" if none)."""
    try:
        return dict(get_task_class(task).metric_units).get(metric, "")
    except KeyError:
        return ""


def _with_unit(task: str, metric: str) -> str:
    unit = metric_unit(task, metric)
    return f"{metric} ({unit})" if unit else metric


def _informative(metric: str, num_classes: Optional[int]) -> bool:
    """False for a top-k accuracy with k >= the number of classes: it is 1 for any model."""
    top = re.fullmatch(r"top(\d+)", metric)
    return not (top and num_classes is not None and int(top.group(1)) >= num_classes)


def comparison_headline(comparison: Sequence[Mapping[str, Any]], run: Optional[str] = None) -> list[str]:
    """The comparison's heading and what the run is: how many tasks meet MuST's criterion, the
    run's schedule (``run``), and where the criterion is measured, so a short schedule's misses
    read as what they are."""
    met = sum(bool(r["pass"]) for r in comparison)
    lines = [f"## Student vs teachers: {met} of {len(comparison)} tasks meet the MuST criterion", ""]
    note = f"{run}. " if run else ""
    return lines + [note + "The criterion (the student matches or beats each teacher on its own task, within "
                    "`evaluate.tolerance`) is what `jobs/configs/must-synthetic.yaml` is sized to meet (README, "
                    "`must-synthetic`); a shorter schedule such as the demo's shows the pipeline working, "
                    "not the criterion.", ""]


def metrics_markdown(results: Mapping[str, Mapping[str, Any]],
                     comparison: Optional[Sequence[Mapping[str, Any]]] = None,
                     num_classes: Optional[int] = None, run: Optional[str] = None) -> str:
    """Markdown: the student-vs-teachers table (if any) under :func:`comparison_headline`, then
    one table per model (every metric of every scored task with its unit, with the trivial
    baseline's primary metric), then one line per reason a model was not scored on a task. Top-k
    accuracies with k >= ``num_classes`` are left out (always 1)."""
    out = ["# Evaluation", ""]
    if comparison:
        out += [*comparison_headline(comparison, run),
                md_table(["task", "metric", "better", "student", "teacher", "ratio", "criterion", "trivial", "pass"],
                         [[r["task"], _with_unit(r["task"], str(r["metric"])), r["direction"], r["student"],
                           r["teacher"], r["ratio"], r["criterion"], r["trivial"], "PASS" if r["pass"] else "FAIL"]
                          for r in comparison]), ""]
    not_scored: dict[str, dict[str, list[str]]] = {}
    hidden: set[str] = set()
    for name, res in results.items():
        tables = ", ".join(f"`{p}`" for p in res.get("tables", []))
        out += [f"## {name}", "", f"`{res.get('model')}` on {tables}: {res.get('rows')} images", ""]
        rows = []
        for task, e in res.get("tasks", {}).items():
            others = []
            for k, v in e["metrics"].items():
                if k == e["primary_metric"]:
                    continue
                if not _informative(k, num_classes):
                    hidden.add(k)
                    continue
                others.append(f"{_with_unit(task, k)} {fmt_number(v)}")
            metric = e["primary_metric"]
            primary = f"**{metric}**" + (f" ({metric_unit(task, metric)})" if metric_unit(task, metric) else "")
            rows.append([task, primary, e["value"], e["trivial_value"], "yes" if e["beats_trivial"] else "no",
                         e["labelled_rows"], ", ".join(others)])
        out += [md_table(["task", "metric", "value", "trivial", "beats trivial", "n", "other metrics"], rows), ""]
        for task, why in res.get("skipped", {}).items():
            not_scored.setdefault(why, {}).setdefault(name, []).append(task)
    if not_scored:
        out += ["## Not scored", ""]
        for why, by_model in not_scored.items():
            out.append(f"- {why}: " + "; ".join(f"{m} ({', '.join(ts)})" for m, ts in by_model.items()))
        out.append("")
    if hidden:
        out += [f"Not shown: {', '.join(sorted(hidden))} (only {num_classes} classes: always 1).", ""]
    return "\n".join(out).rstrip() + "\n"


def write_metrics(out_dir: str, results: Mapping[str, Mapping[str, Any]],
                  comparison: Optional[Sequence[Mapping[str, Any]]] = None,
                  extra: Optional[Mapping[str, Any]] = None, num_classes: Optional[int] = None,
                  run: Optional[str] = None) -> dict[str, str]:
    """Write ``<out_dir>/metrics.json`` (strict JSON: ``{"models": results, "comparison": rows,
    "passed": bool|null, ...extra}``) and ``<out_dir>/metrics.md`` (:func:`metrics_markdown`, given
    the table's ``num_classes`` and the ``run`` description); returns both paths."""
    payload: dict[str, Any] = {"models": dict(results)}
    if comparison is not None:
        payload["comparison"] = list(comparison)
        payload["passed"] = comparison_passed(comparison)
    payload.update(extra or {})
    json_path = os.path.join(out_dir, METRICS_JSON)
    md_path = os.path.join(out_dir, METRICS_MD)
    write_atomic(json_path, dumps_strict(payload, indent=2, sort_keys=True) + "\n")
    write_atomic(md_path, metrics_markdown(results, comparison, num_classes, run))
    return {"metrics_json": json_path, "metrics_md": md_path}


def headline(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
    """``{model name: {task: primary metric value}}`` (strict-JSON-safe), for job summaries."""
    return {name: {t: strict_json(e["value"]) for t, e in res.get("tasks", {}).items()}
            for name, res in results.items()}
