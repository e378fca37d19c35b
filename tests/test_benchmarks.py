"""jobs/benchmark.py end to end at tiny sizes, in-process on the session's Ray: ``all --smoke``
runs every benchmark once through the job's own parser and functions and regenerates a docs
page. Correctness only (keys, counts, positive rates, the doc's hand-written text kept); no
timing asserts - these sizes measure nothing."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from benchmarks.doc import BEGIN, END
from tests.conftest import REPO

# the label benchmark is exercised by tests/label/test_labeling.py::test_benchmark_label_smoke
ONLY = ["train", "loader", "flops", "precision", "memory", "scaling"]


def _job():
    spec = importlib.util.spec_from_file_location("benchmark_job", REPO / "jobs" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    """``all --smoke`` once for the module: (the job's JSON result, the doc path)."""
    root = tmp_path_factory.mktemp("bench")
    doc = root / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nintro by hand\n\n{BEGIN}\nstale figures\n{END}\n\noutro by hand\n")
    argv = ["all", "--smoke", "--write", str(doc), *[a for n in ONLY for a in ("--only", n)],
            "--set", f"paths.root={root}", "--set", "world.image_size=32", "--set", "student.global_batch_size=8",
            "--set", "student.model.fpn_channels=32", "--set", "label.batch_size=8", "--set", "label.shard_size=8"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")  # Ray Train ends ~2 s sooner
        result = _job().main(argv)
    json.dumps(result)  # the job prints it as one JSON line
    print("benchmark wall seconds:", {n: r.get("wall_s") for n, r in result["results"].items()})
    return result, doc


def test_all_runs_every_benchmark_and_reports_checks(run):
    result, _ = run
    assert result["errors"] == [] and sorted(result["results"]) == sorted(ONLY)
    for name, r in result["results"].items():
        assert r["benchmark"] == name and r["checks"], name
        for c in r["checks"]:
            # a figure may be <= 0 legitimately (memory growth of a streaming actor can be negative)
            assert isinstance(c["value"], (int, float)) and math.isfinite(c["value"]), c
            assert set(c) == {"name", "value", "op", "target", "met"}
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]


def test_train_both_sides_and_ratio(run):
    r = run[0]["results"]["train"]
    assert r["global_batch"] == 8 and r["steps"] == 2 and r["warmup_steps"] == 1 and len(r["tasks"]) == 5
    assert r["plain_images_per_s"] > 0 and set(r["plain_images_per_s_by_threads"]) == {"1"}
    ray = r["ray"]["1x2"]  # one worker holding both CPUs (2 torch threads)
    assert ray["images_per_s"] > 0 and ray["ratio"] == r["ratio_1x2"] > 0 and ray["torch_threads"] == 2
    (one,) = r["runs"]["ray"]["1x2"]
    assert one["world_size"] == 1 and one["steps"] == 2 and one["global_batch"] == 8
    assert len(r["runs"]["plain"]["1"]) == 2  # plain, Ray, plain


def test_loader_and_consumption(run):
    r = run[0]["results"]["loader"]
    (loader,) = r["runs"]["loader"]
    assert loader["batches"] == 64 // 8 - 1 and loader["images"] == loader["batches"] * 8
    assert r["loader_images_per_s"] > 0 and r["train_images_per_s"] > 0 and r["collate_images_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["loader_images_per_s"] / r["train_images_per_s"], rel=1e-2)


def test_flops_counts_and_utilisation(run):
    r = run[0]["results"]["flops"]
    assert r["peak_gflops"]["1"] > 0
    assert r["teacher"]["mflop_per_image"] > 0 and r["student"]["mflop_per_image"] > r["teacher"]["mflop_per_image"] / 5
    names = [v["name"] for v in r["teacher"]["variants"] + r["student"]["variants"]]
    assert any("channels_last" in n for n in names) and any("batch 4" in n for n in names)
    for v in r["teacher"]["variants"] + r["student"]["variants"]:
        assert v["images_per_s"] > 0 and 0 < v["utilisation"]


def test_precision_rates_agreement_and_auto(run):
    r = run[0]["results"]["precision"]
    assert set(r["teacher"]["images_per_s"]) == set(r["student"]["images_per_s"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in [*r["teacher"]["images_per_s"].values(), *r["student"]["images_per_s"].values()])
    assert sorted(r["teacher"]["agreement"]) == sorted(r["teacher"]["teachers"])
    assert r["teacher"]["agreement"]["classification"]["top1"] <= 1.0
    assert r["auto_resolves_to"] == ("bf16" if r["native_bf16"] else "fp32")


def test_flops_reports_the_theoretical_peak_with_its_sources(run):
    fma = run[0]["results"]["flops"]["fma_peak"]
    assert fma["vector_bits"] in (128, 256, 512) and fma["fp32_lanes"] == fma["vector_bits"] // 32
    if fma["clock_ghz"] and fma["fma_units"]:
        assert fma["gflops_per_core"] == pytest.approx(2 * fma["fp32_lanes"] * fma["fma_units"] * fma["clock_ghz"],
                                                       abs=0.1)
        assert 0.3 < fma["clock_ghz"] < 7 and fma["clock_from"] and fma["fma_units_from"]


def test_memory_and_scaling_label_every_image(run):
    mem = run[0]["results"]["memory"]
    assert mem["runs"]["n"]["rows"] == 8 and mem["runs"]["4n"]["rows"] == 32
    assert mem["rss_n_mb"] > 0 and mem["rss_4n_mb"] > 0 and mem["growth"] == pytest.approx(
        mem["rss_4n_mb"] / mem["rss_n_mb"] - 1, abs=1e-3)
    sc = run[0]["results"]["scaling"]
    assert sc["actors"] == [1, 2] and sc["cpus_per_actor"] * 2 + sc["decode_num_cpus"] <= sc["cores"]
    assert all(x["rows"] == 16 for rs in sc["runs"].values() for x in rs)
    assert sc["actors_used"]["1"] == [1] and 1 <= sc["actors_used"]["2"][0] <= 2 and sc["speedup"] > 0
    assert len(sc["capacity_before_after"]) == 2 and sc["capacity"] > 0 and sc["efficiency"] > 0
    assert all(v > 0 for v in sc["actor_cpu_ms_per_image"].values())


def test_doc_regenerated_between_markers(run):
    _, doc = run
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro by hand\n") and text.rstrip().endswith("outro by hand")
    assert "stale figures" not in text and text.count(BEGIN) == 1 and text.count(END) == 1
    block = text[text.index(BEGIN):text.index(END)]
    assert "### Machine" in block and "| train |" in block and "| scaling |" in block and "```json" in block
    raw = block.split("```json\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [json.loads(line)["benchmark"] for line in raw] == ONLY


@pytest.mark.parametrize("argv, message", [
    (["train", "--ray", "2by1"], "WORKERSxCPUS"),
    (["memory", "--num", "0"], "must be >= 1"),
    (["scaling", "--decode-cpus", "-1"], "must be > 0"),
])
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _job().main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_scale_plans_describes_and_verifies_in_fresh_drivers(ray_session, demo_config, tmp_path):
    """``jobs/benchmark.py scale``'s function at a tiny size (the labelling part is the job the
    label tests run): the size in its own driver process, every id planned, described, committed
    and verified; the figures are finite."""
    from benchmarks.scale import ScaleOptions, benchmark_scale
    from must_ray.config import load_config

    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [f"paths.root={tmp_path}", "label.plan_piece_rows=2000"])
    r = benchmark_scale(cfg, ScaleOptions(ids=[6000], images=[0], shard_size=500, workdir=str(tmp_path / "w")))
    assert [(p["ids"], p["rows"], p["shards"], p["descriptors"]) for p in r["plans"]] == [(6000, 6000, 12, 12)]
    # three plan pieces of 2000 ids: one verify task each (a one-piece plan is checked in the driver)
    assert all(p["rss_peak_mb"] >= p["rss_plan_mb"] > 0 and p["plan_s"] > 0 and p["verify_tasks"] == 3
               for p in r["plans"])
    assert r["labelling"] == [] and len(r["checks"]) == 2 and all(math.isfinite(c["value"]) for c in r["checks"])
    json.dumps(r)
