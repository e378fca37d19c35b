"""The exactly-once check of a labelling output, as a Ray job: one task per plan piece checks its
shards, the driver adds up counts and never reads an id.

Every planned id belongs to exactly one shard (``label.plan``) and each shard has its own part and
quarantine file, so "every planned id in exactly one part or quarantine file, no duplicates" is
"for every shard: its part ids and quarantine ids are disjoint, each without duplicates, and
together exactly its planned ids" plus "no part or quarantine file of a shard that is not
planned". :func:`check_shards` is the first, per piece (in a task); :func:`verify_output` the
second (a listing of file names, one directory at a time) and the sums.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from must_ray.label.inputs import read_plan_batch
from must_ray.label.plan import Plan, run_tasks
from must_ray.label.store import OutputStore

EXAMPLES = 3
PROBLEMS = {
    "duplicate_written": "duplicate written ids",
    "duplicate_quarantined": "duplicate quarantined ids",
    "both": "ids both written and quarantined",
    "not_planned": "ids not in the plan",
    "missing": "planned ids missing",
}


def _problem(problems: dict[str, list], kind: str, ids: list[str]) -> None:
    if ids:
        entry = problems.setdefault(kind, [0, []])
        entry[0] += len(ids)
        entry[1] = (entry[1] + sorted(ids)[:EXAMPLES])[:EXAMPLES]


def _duplicates(ids: list[str]) -> list[str]:
    return [i for i, n in Counter(ids).items() if n > 1 for _ in range(n - 1)]


def check_shards(store: OutputStore, piece: str, shards: list[tuple[int, int]]) -> dict[str, Any]:
    """Check ``shards`` (``(shard, batch in piece)``) of plan piece ``piece`` against their part and
    quarantine files; returns counts, quarantine reasons and problems (``{kind: [n, examples]}``)."""
    out: dict[str, Any] = {"shards": 0, "inputs": 0, "rows": 0, "quarantined": 0, "reasons": Counter(),
                           "problems": {}}
    problems = out["problems"]
    for shard, batch in shards:
        planned = read_plan_batch(piece, batch).column("image_id").to_pylist()
        out["shards"] += 1
        out["inputs"] += len(planned)
        part = store.part_path(shard)
        if not store.exists(part):
            _problem(problems, "missing", planned)
            continue
        written = store.read_ids(part)
        quarantined: list[str] = []
        qpath = store.quarantine_path(shard)
        if store.exists(qpath):
            q = pq.read_table(qpath, columns=["image_id", "reason"], filesystem=store.fs)
            quarantined = q.column("image_id").to_pylist()
            out["reasons"].update(q.column("reason").to_pylist())
        out["rows"] += len(written)
        out["quarantined"] += len(quarantined)
        _problem(problems, "duplicate_written", _duplicates(written))
        _problem(problems, "duplicate_quarantined", _duplicates(quarantined))
        w, q_, p = set(written), set(quarantined), set(planned)
        _problem(problems, "both", list(w & q_))
        _problem(problems, "not_planned", list((w | q_) - p))
        _problem(problems, "missing", list(p - w - q_))
    return out


def verify_output(store: OutputStore, plan: Plan, remote: bool = True) -> dict[str, Any]:
    """Exactly once, checked shard by shard (Ray tasks, one per plan piece, when ``remote`` and
    the plan has more than one piece); then the temp files and an empty quarantine folder removed.
    Returns ``inputs``, ``rows``, ``quarantined``, ``quarantine_reasons`` and ``exactly_once``
    (what was checked, by how many tasks, in how many seconds); raises RuntimeError naming
    examples when the check fails."""
    t0 = time.perf_counter()
    groups = plan.by_piece()
    # one piece (at most label.plan_piece_rows ids) is checked here: a lone task adds a worker's
    # start-up and imports, and on a small node waits for the pipeline's actors to free their CPUs
    in_tasks = remote and len(groups) > 1
    results = run_tasks([(check_shards, (store, plan.piece_uri(k), shards)) for k, shards in groups], in_tasks,
                        tag="verify")
    total: dict[str, Any] = {"shards": 0, "inputs": 0, "rows": 0, "quarantined": 0}
    reasons: Counter = Counter()
    problems: dict[str, list] = {}
    for r in results:
        for k in total:
            total[k] += r[k]
        reasons.update(r["reasons"])
        for kind, (n, examples) in r["problems"].items():
            entry = problems.setdefault(kind, [0, []])
            entry[0] += n
            entry[1] = (entry[1] + examples)[:EXAMPLES]
    messages = [f"{n} {PROBLEMS[kind]} (e.g. {examples})" for kind, (n, examples) in problems.items()]
    for what, shards in (("part", store.committed_shards()), ("quarantine", set(store.quarantine_shards()))):
        stray = sorted(s for s in shards if s >= plan.num_shards)
        if stray:
            messages.append(f"{len(stray)} {what} files of shards not in the plan (e.g. shards {stray[:EXAMPLES]})")
    if total["rows"] + total["quarantined"] != plan.num_rows:
        messages.append(f"rows_written {total['rows']} + rows_quarantined {total['quarantined']} "
                        f"!= inputs {plan.num_rows}")
    if messages:
        raise RuntimeError(f"exactly-once check failed for {store.output}: " + "; ".join(messages))
    store.clean_tmp()
    if not total["quarantined"]:
        store.remove_empty_quarantine()
    return {"inputs": plan.num_rows, "rows": total["rows"], "quarantined": total["quarantined"],
            "quarantine_reasons": dict(sorted(reasons.items())),
            "exactly_once": {"passed": True, "shards": total["shards"], "inputs": total["inputs"],
                             "tasks": len(groups) if in_tasks else 0, "seconds": round(time.perf_counter() - t0, 2)}}


__all__ = ["verify_output", "check_shards"]
