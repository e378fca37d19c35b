"""metrics.md reads as a report: units on every metric, one line per reason a model was not
scored (not one per model and task), no top-k accuracy that is 1 by construction."""
from must_ray.evaluate.compare import compare, metrics_markdown


def _entry(metric, value, others, hib=True):
    return {"primary_metric": metric, "higher_is_better": hib, "value": value, "trivial_value": value / 2,
            "beats_trivial": True, "labelled_rows": 8, "metrics": {metric: value, **others}}


def _results():
    cls = _entry("top1", 0.5, {"top5": 1.0})
    depth = _entry("abs_rel", 0.2, {"rmse": 0.4}, hib=False)
    return {
        "student": {"model": "s.pt", "tables": ["t"], "rows": 8, "tasks": {"classification": cls, "depth": depth},
                    "skipped": {}},
        "teacher_classification": {"model": "c.pt", "tables": ["t"], "rows": 8, "tasks": {"classification": cls},
                                   "skipped": {"depth": "no head for this task in the model"}},
        "teacher_depth": {"model": "d.pt", "tables": ["t"], "rows": 8, "tasks": {"depth": depth},
                          "skipped": {"classification": "no head for this task in the model"}},
    }


def test_units_grouped_skips_and_no_trivial_top_k():
    res = _results()
    rows = compare(res["student"], {"classification": res["teacher_classification"], "depth": res["teacher_depth"]})
    md = metrics_markdown(res, rows, num_classes=4)
    assert "| classification | top1 (0-1) |" in md and "**abs_rel** (ratio)" in md and "rmse (m) 0.4000" in md
    assert md.count("no head for this task in the model") == 1
    assert "- no head for this task in the model: teacher_classification (depth); teacher_depth (classification)" in md
    assert "top5 (0-1)" not in md and "Not shown: top5 (only 4 classes" in md
    assert "top5 (0-1) 1.0000" in metrics_markdown(res, rows, num_classes=10)


def test_headline_counts_tasks_meeting_the_criterion_and_says_what_the_run_is():
    res = _results()
    res["student"]["tasks"]["depth"] = _entry("abs_rel", 0.4, {"rmse": 0.8}, hib=False)  # worse than its teacher
    rows = compare(res["student"], {"classification": res["teacher_classification"], "depth": res["teacher_depth"]})
    md = metrics_markdown(res, rows, num_classes=4, run="Run `demo`: student 300 steps")
    assert "## Student vs teachers: 1 of 2 tasks meet the MuST criterion" in md
    assert "Run `demo`: student 300 steps. The criterion" in md and "must-synthetic.yaml" in md
