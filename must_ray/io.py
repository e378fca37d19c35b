"""Small I/O pieces every step shares: file names of a run's outputs, atomic writes, strict JSON,
Markdown tables, and telling a URI from a local path."""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np

#: the exported model of a training run (a teacher or the student), in its out_dir
MODEL_FILE = "model.pt"
#: the run's training history next to it (one JSON object per report)
HISTORY_FILE = "metrics.jsonl"
#: a training run's summary next to it
SUMMARY_FILE = "summary.json"
#: an evaluation's outputs in the reports folder
METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` and numpy scalars/arrays turned into
    Python values, so ``json.dumps(..., allow_nan=False)`` accepts it (depth's ``abs_rel`` is inf
    when nothing was scored; JSON has no inf)."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (see :func:`strict_json`)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` locations (``s3://``, ``gs://``, ``file://`` ...), False for paths."""
    return "://" in str(path)


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary name beside local file ``path`` to write to; it replaces ``path`` in one rename
    when the block succeeds (readers never see a half-written file), and is removed when it fails."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str, data: str | bytes) -> None:
    """Write text or bytes to local file ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells formatted with 4 decimals)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt_number(c) for c in r) + " |")
    return "\n".join(lines)


def fmt_number(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"
