"""Training curves of several runs as one matplotlib figure (Agg, no display).

Each run's ``metrics.jsonl`` (one JSON object per report with ``step``) gives one line per loss
key: every key starting with ``loss`` (the trainer's ``loss`` and ``loss_<task>``; nested
``{"loss": {"depth": x}}`` reads as ``loss/depth``; null or non-finite values skipped). One
subplot per key, the total first and then the tasks in registry order; a run keeps its tab10
colour in every subplot, and one legend beside the subplots names the runs.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import matplotlib
from matplotlib.figure import Figure

from must_ray.tasks import registered_task_names

#: a subplot's y axis turns logarithmic when its values span more than this factor
LOG_SPAN = 20.0


def _flatten(rec: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in rec.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _flatten(v, key)
        else:
            yield key, v


def read_curves(path: str) -> dict[str, list[tuple[float, float]]]:
    """``{loss key: [(step, value), ...]}`` from one ``metrics.jsonl`` (bad lines, non-numeric and
    non-finite values skipped; a record without ``step`` uses its line number)."""
    series: dict[str, list[tuple[float, float]]] = {}
    if not os.path.isfile(path):
        return series
    with open(path) as f:
        for lineno, line in enumerate(f):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, Mapping):
                continue
            step = rec.get("step", lineno)
            if isinstance(step, bool) or not isinstance(step, (int, float)):
                step = lineno
            for key, v in _flatten(rec):
                if key.startswith("loss") and not isinstance(v, bool) and isinstance(v, (int, float)) \
                        and math.isfinite(v):
                    series.setdefault(key, []).append((float(step), float(v)))
    for pts in series.values():
        pts.sort(key=lambda p: p[0])
    return series


def _task_order(key: str) -> tuple:
    if key == "loss":
        return (0, 0, key)
    task = key[5:] if key[:5] in ("loss/", "loss_", "loss.") else key
    names = registered_task_names()
    return (1, names.index(task) if task in names else len(names), key)


def plot_curves(metrics_jsonl_paths: Mapping[str, str], out_png: str, *, keys: Optional[Sequence[str]] = None,
                panel_size: tuple[int, int] = (420, 280), columns: int = 3, log_y: Optional[bool] = None,
                title: Optional[str] = None, dpi: int = 100) -> dict[str, Any]:
    """Training curves of several runs (``{run name: path to its metrics.jsonl}``) as one PNG.

    One subplot of about ``panel_size`` pixels per loss key (or per key of ``keys``), ``columns``
    to a row, x = step, y = loss on a log scale when ``log_y`` or, by default, when the subplot's
    values span more than :data:`LOG_SPAN` x. Missing or empty files are skipped; with no curves
    at all the PNG says so. Returns ``path``, ``size`` (w, h pixels), ``panels`` (keys),
    ``log_panels`` (those with a log y axis), ``runs`` (all given), ``legend`` (the runs drawn,
    in legend order), ``colours`` (run -> RGB) and ``points``."""
    runs = {name: read_curves(path) for name, path in metrics_jsonl_paths.items()}
    all_keys = sorted({k for s in runs.values() for k in s}, key=_task_order)
    panel_keys = [k for k in (keys if keys is not None else all_keys) if k in all_keys]
    palette = matplotlib.colormaps["tab10"].colors
    colours = {name: palette[i % len(palette)] for i, name in enumerate(metrics_jsonl_paths)}
    ncols = max(1, min(columns, len(panel_keys) or 1))
    nrows = max(1, math.ceil(len(panel_keys) / ncols))
    fig = Figure(figsize=(ncols * panel_size[0] / dpi, nrows * panel_size[1] / dpi + (0.4 if title else 0.0)),
                 dpi=dpi, layout="constrained")
    if title:
        fig.suptitle(title, fontsize=13, x=0.01, ha="left")
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    points, drawn, logs = 0, [], []
    for ax, key in zip(axes, panel_keys):
        lines = {name: s[key] for name, s in runs.items() if s.get(key)}
        values = [y for pts in lines.values() for _, y in pts]
        lo, hi = min(values), max(values)
        use_log = bool((log_y if log_y is not None else hi > LOG_SPAN * lo) and lo > 0)
        for name, pts in lines.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=colours[name], linewidth=2, label=name,
                    marker="o" if len(pts) == 1 else None)
            points += len(pts)
            if name not in drawn:
                drawn.append(name)
        if use_log:
            ax.set_yscale("log")
            logs.append(key)
        ax.set_title(key + ("  (log)" if use_log else ""), fontsize=11, loc="left")
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=9)
        ax.grid(True, color="0.9", linewidth=0.8)
    for ax in axes[len(panel_keys):]:
        ax.set_axis_off()
    if not panel_keys:
        axes[0].text(0.5, 0.5, "no loss curves found", ha="center", va="center", fontsize=13, color="darkred",
                     transform=axes[0].transAxes)
    order = [name for name in metrics_jsonl_paths if name in drawn]
    if order:
        handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
        fig.legend([handles[n] for n in order], order, loc="outside right upper", frameon=False, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=dpi, facecolor="white")
    size = tuple(int(round(v * dpi)) for v in fig.get_size_inches())
    return {"path": out_png, "size": size, "panels": panel_keys, "log_panels": logs, "runs": list(metrics_jsonl_paths),
            "legend": order, "colours": {n: tuple(int(round(c * 255)) for c in colours[n]) for n in order},
            "points": points}


__all__ = ["LOG_SPAN", "plot_curves", "read_curves"]
