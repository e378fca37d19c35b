"""The Ray Train loop (must_ray.train.driver) end to end: real Ray (the session fixture, 2 CPUs), real
Parquet tables from the synthetic world, tiny models.

(That every teacher, trained this way, beats its task's trivial baseline is asserted by the demo
pipeline's end-to-end test, tests/test_demo_pipeline.py, on the pipeline's real teachers.)

* a student on a table where a task is null in every row leaves that task's head untouched;
* a worker killed mid-run (a fault-injecting step hook, tests/faults.py) -> the run restarts from
  its last checkpoint;
* re-submitting a run with the same name resumes it, from the checkpoint Ray Train registered (an
  orphan's unregistered checkpoint is removed, not reported);
* a Trainer rebuilt from a checkpoint's state continues bit for bit (step, EMA, optimiser);
* one config and seed give one data order (the batches a worker trains on), collated in the step's
  thread or in Ray Data's prefetch threads;
* bf16 precision on a CPU runs the forward in bf16 and trains fp32 weights;
* the EMA (timm's ModelEmaV3, configured) follows the warm-up formula exactly;
* an elastic group (1, 2) completes on two CPUs; the teacher job's CLI ends with its summary line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from must_ray.config import load_config
from must_ray.models import MultiTaskModel, load_model, save_model
from must_ray.table import conform, examples_schema, table_classes
from must_ray.tasks import build_tasks
from must_ray.train.checkpoint import CHECKPOINT_FORMAT, STATE_FILE
from must_ray.train.collate import TrainCollate
from must_ray.train.driver import ingest_options, plan_run, train, training_dataset
from must_ray.train.optim import build_ema, lr_factor
from must_ray.train.trainer import RunSpec, Trainer
from must_ray.typed_config import ConfigError, config_to_dict
from must_ray.world import NUM_CATEGORIES
from must_ray.world.splits import RenderBatch, split_provenance
from tests import faults
from tests.conftest import REPO

CONFIG = REPO / "jobs" / "configs" / "demo.yaml"


@pytest.fixture(autouse=True)
def _fast_train_polling(monkeypatch):
    """Ray Train's controller polls its workers every 2 s by default; a short run ends ~2 s sooner
    with 0.3 s (propagated from the driver's environment to the controller)."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")
# A short run: small model, frequent reports, one worker that leaves CPU for the data readers.
FAST = ["model.fpn_channels=32", "schedule.warmup_steps=10", "report_every_steps=5", "checkpoint.every_steps=50",
        "scaling.cpus_per_worker=0.8", "ema_decay=0.0", "checkpoint.max_failures=2", "scaling.num_workers=[1, 1]"]


def make_cfg(root, role="teacher", keys=None, image_size=32, extra=()):
    """The demo config for a short run of ``role``; ``keys``: ``{dotted key under the role: value}``."""
    overrides = [f"paths.root={root}", f"world.image_size={image_size}"] + [f"{role}.{o}" for o in FAST]
    overrides += [f"{role}.{k}={json.dumps(v) if isinstance(v, (list, str)) else v}" for k, v in (keys or {}).items()]
    return load_config(CONFIG, overrides + list(extra))


def world_table(cfg, split_name, out_dir, num, image_size=None, tasks=None):
    """A world split rendered in-process and written as one Parquet file with provenance."""
    split = replace(cfg.world.splits[split_name], num=num)
    if tasks is not None:
        split = replace(split, tasks=list(tasks))
    world = replace(cfg.world, image_size=image_size or cfg.world.image_size)
    table = RenderBatch(world, split, cfg.tasks)({"id": np.arange(num)})
    table = table.cast(examples_schema(split.tasks, split_provenance(world, split_name, split)))
    os.makedirs(out_dir, exist_ok=True)
    pq.write_table(table, os.path.join(out_dir, f"{split_name}-00000.parquet"))
    return str(out_dir)


# ----------------------------------------------------------------------------- student, masking


def test_elastic_student_leaves_heads_of_unlabelled_tasks_untouched(ray_session, tmp_path):
    """An elastic group (1, 2) completes on two CPUs. Segmentation is null in every row: its head's
    parameters and BatchNorm statistics stay bit-identical (and its learned task weight stays 0);
    the labelled tasks' heads move. Uncertainty weighting and EMA on; two workers = DDP."""
    tasks = ["classification", "segmentation", "depth"]
    base = load_config(CONFIG, ["world.image_size=32"])
    # table a: depth labels, segmentation columns present but null in every row
    a = world_table(base, "test", tmp_path / "a", 64, tasks=["depth"])
    pq.write_table(conform(pq.read_table(a), ["segmentation", "depth"]), os.path.join(a, "test-00000.parquet"))
    # table b: classification + depth (classification exists only here: partial labels)
    b = world_table(base, "test", tmp_path / "b", 64, tasks=["classification", "depth"])
    torch.manual_seed(5)
    init = MultiTaskModel("test_resnet", build_tasks(tasks, NUM_CATEGORIES, base.tasks), fpn_channels=32)
    init_path = save_model(str(tmp_path / "init.pt"), init, num_classes=NUM_CATEGORIES, task_cfgs=base.tasks,
                           fpn_channels=32)
    cfg = make_cfg(tmp_path, "student", {"schedule.max_steps": 6, "global_batch_size": 16, "ema_decay": 0.9,
                                         "loss.weighting": "uncertainty", "scaling.num_workers": [1, 2],
                                         "report_every_steps": 3},
                   extra=[f"student.model.init_checkpoint={init_path}"])
    out = tmp_path / "student"  # given as a file:// URI: outputs are staged and uploaded with pyarrow.fs
    summary = train(cfg, "student", [a, b], tasks=tasks, out_dir=f"file://{out}")
    assert summary["model"] == f"file://{out}/model.pt"
    summary.update(model=str(out / "model.pt"), metrics=str(out / "metrics.jsonl"))
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert summary["world_size"] in (1, 2) and summary["steps"] == 6
    assert summary["global_batch"] == 16  # per-worker batch = 16 // world_size
    assert summary["final_losses"]["segmentation"] is None
    assert summary["final_losses"]["depth"] > 0 and summary["final_losses"]["classification"] > 0
    trained, _ = load_model(summary["model"])
    before, after = init.state_dict(), trained.state_dict()
    seg = [k for k in before if k.startswith("heads.segmentation.")]
    assert seg and all(torch.equal(before[k], after[k]) for k in seg), "segmentation head changed"
    for task in ("depth", "classification"):
        keys = [k for k in before if k.startswith(f"heads.{task}.") and before[k].dtype.is_floating_point]
        assert any(not torch.equal(before[k], after[k]) for k in keys), f"{task} head did not train"
    state = torch.load(os.path.join(summary["checkpoint"], STATE_FILE), weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["tasks"] == tasks and state["step"] == 6
    assert float(state["weighting"]["log_vars.segmentation"]) == 0.0
    assert float(state["weighting"]["log_vars.depth"]) != 0.0
    assert {"model", "optimizer", "scheduler", "ema", "config", "epoch"} <= set(state)
    lines = [json.loads(x) for x in open(summary["metrics"])]
    assert [m["step"] for m in lines] == [3, 6] and all(m["images_per_s"] > 0 for m in lines)


# ----------------------------------------------------------------------------- fault tolerance, resume


@pytest.fixture(scope="module")
def small_table(tmp_path_factory, demo_config):
    d = tmp_path_factory.mktemp("small")
    cfg = load_config(CONFIG, ["world.image_size=32"])
    return world_table(cfg, "teacher_depth", d / "depth", 128)


def _run_job(script, args, capsys, monkeypatch):
    """Run a job's main() in this process (it reuses the session's Ray) and parse its summary line."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(script)] + [str(a) for a in args])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_killed_worker_restarts_then_resubmitted_run_resumes(ray_session, tmp_path, small_table, capsys,
                                                              monkeypatch):
    """(1) The teacher run of jobs/train_teacher.py (its config, called as a library), 10 steps,
    checkpoints every 4; a step hook kills the worker after step 6 -> Ray Train restarts the
    group from the step-4 checkpoint and the run completes. (2) The job re-submitted with the same
    --run-name and 14 steps continues from step 10. (3) Reusing the name for another task is
    refused before any work."""
    job = REPO / "jobs" / "train_teacher.py"
    sets = [f"paths.root={tmp_path}", "world.image_size=32"] + [f"teacher.{o}" for o in FAST] + \
        ["teacher.report_every_steps=2", "teacher.checkpoint.every_steps=4", "teacher.global_batch_size=16",
         "teacher.checkpoint.run_name=again"]
    marker = tmp_path / "fault.marker"
    faults.shippable()
    first = train(load_config(CONFIG, sets + ["teacher.schedule.max_steps=10"]), "teacher", [small_table],
                  tasks=["depth"], out_dir=str(tmp_path / "t"), step_hooks=[faults.ExitAfterStep(6, str(marker))])
    assert marker.exists(), "the fault was not injected"
    assert first["steps"] == 10 and first["resumed_from"] is None and first["tasks"] == ["depth"]
    # restarted from the step-4 checkpoint (not from 0); the history is the surviving timeline
    assert [a["start_step"] for a in first["attempts"]] == [0, 4], first["attempts"]
    assert [json.loads(x)["step"] for x in open(first["metrics"])] == [2, 4, 6, 8, 10]
    # Ray Train's storage is under --out; the summary names what the run restored, not the newest
    # directory on disk: an orphaned worker of a killed driver may leave a checkpoint Ray Train
    # never registered (the same layout, a later step), which the resubmission removes
    experiment = tmp_path / "t" / "ray_train" / "again"
    assert first["checkpoint"].startswith(str(experiment)) and first["experiment_dir"] == str(experiment)
    orphan = experiment / "checkpoint_step00000012_a1"
    shutil.copytree(first["checkpoint"], orphan)
    meta = json.loads((orphan / "meta.json").read_text())
    (orphan / "meta.json").write_text(json.dumps({**meta, "step": 12, "step_in_epoch": 4}))

    common = ["--task", "depth", "--data", small_table, "--batch-size", "16", "--out", tmp_path / "t",
              "--run-name", "again"] + [x for o in sets for x in ("--set", o)]
    t0 = time.time()
    second = _run_job(job, common + ["--steps", "14"], capsys, monkeypatch)
    resume_wall = time.time() - t0
    assert second["resumed_from"] == 10 and second["steps"] == 14 and os.path.isfile(second["model"])
    assert not orphan.exists() and second["checkpoint"].startswith(str(experiment))
    assert [a["start_step"] for a in second["attempts"]] == [0, 4, 10]
    assert [json.loads(x)["step"] for x in open(second["metrics"])] == [2, 4, 6, 8, 10, 12, 14]
    with capsys.disabled():
        print(f"\nresume: job wall {resume_wall:.1f}s for 4 more steps, checkpoint restore "
              f"{second['attempts'][-1]['restore_s']}s, first step {second['attempts'][-1]['startup_s']}s "
              f"after the worker started", file=sys.stderr)

    seg = world_table(load_config(CONFIG, ["world.image_size=32"]), "teacher_segmentation", tmp_path / "seg", 32)
    with pytest.raises(ConfigError, match="another --run-name"):
        train(make_cfg(tmp_path, keys={"schedule.max_steps": 8, "global_batch_size": 16}), "teacher", [seg],
              out_dir=str(tmp_path / "t"), run_name="again")
    # bad values of plain flags / keys fail like any config error (exit code 2, the key named)
    bad = subprocess.run([sys.executable, str(REPO / "jobs" / "train_student.py"), "--set",
                          "student.optimizer.lr=-1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "student.optimizer.lr must be > 0" in bad.stderr


def test_one_seed_gives_one_data_order(ray_session, tmp_path, small_table):
    """The training input of a run, built twice from one config and seed (the driver's dataset and
    ingest options, a streaming split as Ray Train makes it, the worker's batches), yields the same
    batches in the same order, epoch after epoch, on a table of several files: the file shuffle,
    the cached block order, the local shuffle buffer and the collate threads' batch order are
    seeded and kept in order. With the Trainer's bit-for-bit steps (the test below) one seed is
    one run; two whole runs matched bit for bit (docs/training.md, Reproducibility)."""
    rows = pq.read_table(small_table)
    table = tmp_path / "four-files"
    table.mkdir()
    for i in range(4):
        pq.write_table(rows.slice(32 * i, 32), table / f"part-{i}.parquet")

    def epochs(collate: str = "auto") -> list[torch.Tensor]:
        cfg = make_cfg(tmp_path, keys={"global_batch_size": 16, "input.shuffle_buffer": 48, "seed": 3,
                                       "input.collate": collate})
        plan = plan_run(cfg, "teacher", [str(table)], ["depth"], str(tmp_path / "out"), None)
        dataset, cached = training_dataset(plan)
        assert cached
        dataset.context.execution_options = ingest_options()  # what Ray Train's DataConfig does with them
        shard = dataset.streaming_split(1, equal=True)[0]
        trainer = Trainer(RunSpec(config=config_to_dict(plan.cfg), role="teacher", tasks=plan.tasks,
                                  classes=plan.classes, num_rows=plan.rows, image_size=plan.image_size,
                                  run_name="order", data=plan.data, experiment_dir=plan.experiment_dir))
        out = []
        for epoch in range(2):
            trainer.epoch = epoch
            out.append(torch.cat([b["image"] for b in trainer.batches(shard)]))
        return out

    first, second = epochs(), epochs()
    assert [len(e) for e in first] == [128] * 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1]), "every epoch should be a new order"
    # collated in the training thread or in Ray Data's prefetch threads: the same batches
    for where in ("step", "prefetch"):
        assert all(torch.equal(a, b) for a, b in zip(first, epochs(where))), where


def test_lr_schedule_is_warmup_then_cosine():
    f = [lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.02


# ----------------------------------------------------------------------------- the Trainer, the EMA


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_restored_trainer_continues_bit_for_bit(tmp_path):
    """A Trainer rebuilt from a checkpoint's state (saved and loaded like ``state.pt``) stands at the
    same step with the same EMA, optimiser and learned task weights, and its next steps give
    exactly the weights and EMA of the Trainer that went on without a restart."""
    names = ["classification", "depth"]
    cfg = make_cfg(tmp_path, "student", {"schedule.max_steps": 8, "global_batch_size": 8, "ema_decay": 0.9,
                                         "loss.weighting": "uncertainty"})
    table = world_table(cfg, "test", tmp_path / "table", 32, tasks=names)
    classes = table_classes([table])
    run = RunSpec(config=config_to_dict(cfg), role="student", tasks=names, classes=classes, num_rows=32,
                  image_size=32, run_name="restore", data=[table], experiment_dir=str(tmp_path / "run"))
    collate = TrainCollate(names, len(classes), cfg.tasks, image_size=32, seed=0)
    rows = conform(pq.read_table(table), names)
    batches = [collate(rows.slice(8 * i, 8)) for i in range(4)]

    going = Trainer(run)
    going.build()
    for batch in batches[:2]:
        going.train_step(batch)
    torch.save(going.state_dict(), tmp_path / STATE_FILE)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    restored = Trainer(run)
    restored.build(state, history=[{"step": 2}])
    assert (restored.step, restored.epoch, restored.step_in_epoch) == (going.step, going.epoch, going.step_in_epoch)
    assert restored.step == 2 and restored.history == [{"step": 2}]
    assert [a["start_step"] for a in restored.attempts] == [0, 2]
    assert _same(restored.ema.module.state_dict(), going.ema.module.state_dict())
    assert not _same(restored.ema.module.state_dict(), restored.module.model.state_dict())  # EMA != weights
    assert _same(restored.module.state_dict(), going.module.state_dict())
    assert restored.scheduler.get_last_lr() == going.scheduler.get_last_lr()

    for batch in batches[2:]:
        going.train_step(batch)
        restored.train_step(batch)
    assert restored.step == going.step == 4
    assert _same(restored.module.state_dict(), going.module.state_dict())
    assert _same(restored.ema.module.state_dict(), going.ema.module.state_dict())
    moments = [(s["exp_avg"], r["exp_avg"]) for s, r in zip(going.optimizer.state.values(),
                                                             restored.optimizer.state.values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)


def test_bf16_precision_on_cpu_runs_the_forward_in_bf16_and_keeps_fp32_weights(tmp_path):
    """``student.precision: bf16`` on a CPU worker: the backbone's convolutions run in bf16 under
    autocast, the weights stay fp32 and train (finite losses, weights move); fp32 runs them in fp32."""
    names = ["segmentation", "depth"]
    seen = {}
    for precision in ("bf16", "fp32"):
        cfg = make_cfg(tmp_path, "student", {"schedule.max_steps": 4, "global_batch_size": 8,
                                             "precision": precision})
        table = world_table(cfg, "test", tmp_path / precision, 16, tasks=names)
        classes = table_classes([table])
        trainer = Trainer(RunSpec(config=config_to_dict(cfg), role="student", tasks=names, classes=classes,
                                  num_rows=16, image_size=32, run_name=precision, data=[table],
                                  experiment_dir=str(tmp_path / f"run-{precision}")))
        trainer.build()
        conv = next(m for m in trainer.module.model.modules() if isinstance(m, torch.nn.Conv2d))
        dtypes = []
        conv.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
        before = {k: v.clone() for k, v in trainer.module.model.state_dict().items()}
        rows = conform(pq.read_table(table), names)
        collate = TrainCollate(names, len(classes), cfg.tasks, image_size=32, seed=0)
        for i in range(2):
            trainer.train_step(collate(rows.slice(8 * i, 8)))
        after = trainer.module.model.state_dict()
        assert conv.weight.dtype == torch.float32 and all(v.dtype == before[k].dtype for k, v in after.items())
        assert any(not torch.equal(before[k], v) for k, v in after.items() if v.is_floating_point())
        assert all(np.isfinite(x) for x in trainer.window.stats().tolist())
        seen[precision] = set(dtypes)
    assert seen == {"bf16": {torch.bfloat16}, "fp32": {torch.float32}}


def test_ema_is_timm_model_ema_with_the_usual_warmup():
    """``build_ema`` (timm's ModelEmaV3, configured) = ``decay_t = min(decay, (1 + t) / (10 + t))`` bit
    for bit over the warm-up and after it: float tensors averaged, integer buffers copied."""
    torch.manual_seed(0)
    model = MultiTaskModel("test_resnet", build_tasks(["depth"], NUM_CATEGORIES), fpn_channels=16)
    assert build_ema(model, 0.0) is None
    ema = build_ema(model, 0.95)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    floats = [k for k, v in reference.items() if v.is_floating_point()]
    assert len(floats) < len(reference), "the model has no integer buffer to check"
    for t in range(120):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            for b in model.buffers():
                b.add_(torch.rand_like(b) * 0.01 if b.is_floating_point() else torch.ones_like(b))
        ema.update(model, step=t + 1)
        decay = min(0.95, (1.0 + t) / (10.0 + t))
        current = model.state_dict()
        torch._foreach_lerp_([reference[k] for k in floats], [current[k] for k in floats], 1.0 - decay)
        for k in reference.keys() - set(floats):
            reference[k].copy_(current[k])
    assert _same(ema.module.state_dict(), reference)


def test_teacher_dropping_keeps_each_image_its_worst_task_and_drops_the_others_at_rate_p(tmp_path):
    """``loss.teacher_drop_p``: each labelled image keeps the task with its highest weighted loss
    (computed here independently, one image at a time) and loses each other task's label at about
    rate p; the draw is a function of the step, so a resumed run drops the same labels; steps train."""
    names = ["classification", "segmentation", "depth"]
    cfg = make_cfg(tmp_path, "student", {"schedule.max_steps": 4, "global_batch_size": 16,
                                         "loss.teacher_drop_p": 0.5, "loss.weights": {"depth": 3.0}})
    table = world_table(cfg, "test", tmp_path / "table", 48, tasks=names)
    classes = table_classes([table])
    run = RunSpec(config=config_to_dict(cfg), role="student", tasks=names, classes=classes, num_rows=48,
                  image_size=32, run_name="drop", data=[table], experiment_dir=str(tmp_path / "run"))
    collate = TrainCollate(names, len(classes), cfg.tasks, image_size=32, seed=0)
    from must_ray.models import images_to_tensor
    from must_ray.train.collate import split_batch

    trainer = Trainer(run)
    trainer.build()
    images, targets = split_batch(collate(conform(pq.read_table(table), names)))
    weighting = trainer.module.weighting
    with torch.no_grad():
        outputs = trainer.module(images_to_tensor(images))
    worst = []
    for i in range(48):
        one = {t: weighting.fixed[t] * float(trainer.tasks[t].loss(
            {k: v[i:i + 1] for k, v in outputs[t].items()} if isinstance(outputs[t], dict) else outputs[t][i:i + 1],
            {k: v[i:i + 1] for k, v in targets[t].items()})) for t in names}
        worst.append(max(one, key=one.get))
    kept = weighting.drop_tasks(trainer.tasks, outputs, targets, step=3)
    for i in range(48):
        assert bool(kept[worst[i]]["mask"][i]), (i, worst[i])
    others = [bool(kept[t]["mask"][i]) for i in range(48) for t in names if t != worst[i]]
    assert 0.3 < sum(others) / len(others) < 0.7
    again = weighting.drop_tasks(trainer.tasks, outputs, targets, step=3)
    later = weighting.drop_tasks(trainer.tasks, outputs, targets, step=4)
    assert all(torch.equal(again[t]["mask"], kept[t]["mask"]) for t in names)
    assert any(not torch.equal(later[t]["mask"], kept[t]["mask"]) for t in names)

    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    batches = [collate(conform(pq.read_table(table), names).slice(16 * i, 16)) for i in range(2)]
    for batch in batches:
        trainer.train_step(batch)
    assert trainer.step == 2 and not _same(before, trainer.module.state_dict())
    with pytest.raises(ConfigError, match=r"student.loss.teacher_drop_p must be in \[0, 1\)"):
        make_cfg(tmp_path, "student", {"loss.teacher_drop_p": 1.0})


def test_model_files_are_handed_to_the_workers_as_absolute_paths(tmp_path, monkeypatch):
    """A relative ``student.model.init_checkpoint`` (or ``backbone_weights``) the driver checked is
    opened by workers whose working directory is another: the run config carries absolute paths."""
    from must_ray.train.driver import absolute_model_files

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(tmp_path, "student", extra=["student.model.init_checkpoint=models/a.pt",
                                               "student.model.backbone_weights=w/r.pth",
                                               "teacher.model.init_checkpoint=s3://bucket/t.pt"])
    fixed = absolute_model_files(cfg, "student")
    assert fixed.student.model.init_checkpoint == str(tmp_path / "models" / "a.pt")
    assert fixed.student.model.backbone_weights == str(tmp_path / "w" / "r.pth")
    assert absolute_model_files(cfg, "teacher").teacher.model.init_checkpoint == "s3://bucket/t.pt"
    assert absolute_model_files(load_config(CONFIG), "student") == load_config(CONFIG)
