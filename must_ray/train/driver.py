"""One Ray Train (V2) loop for the specialised teachers and the multi-task student.

:func:`train` is the whole API: it reads examples tables into one Ray Dataset, launches a
``TorchTrainer`` whose workers run :func:`train_loop_per_worker`, and exports the result
(``<out_dir>/model.pt``, ``metrics.jsonl``, ``summary.json``). A teacher is a run with one task
and real labels; the student is a run with every task of the pseudo-label table(s), optionally
unioned with real-label tables (partial labels) - null cells mask a task's loss row by row.

What a worker does (see docs/training.md for the reasoning):

* builds ``MultiTaskModel`` (+ learned task weights when ``task_weighting=uncertainty``), restores
  the latest checkpoint from ``ray.train.get_checkpoint()`` if the run has one (a restart after a
  failure or a re-submitted run), wraps it with ``ray.train.torch.prepare_model`` (DDP when more
  than one worker);
* iterates ``get_dataset_shard("train").iter_torch_batches(batch_size=global // world_size,
  collate_fn=TrainCollate, drop_last=True, local_shuffle_buffer_size=...)``; the collate decodes,
  augments and stacks targets in Ray Data's prefetch threads, overlapped with the step;
* per step: AdamW, linear warm-up + cosine schedule, masked per-task losses weighted fixed or by
  uncertainty (Kendall et al.), gradient clipping, optional EMA of the weights, bf16 autocast and
  channels_last on GPU;
* a task with no labelled row in the *global* batch is not touched: its head runs in eval mode
  (no BatchNorm statistics update), its loss is a zero connected to the graph (DDP sees every
  parameter used) and its head's gradients (and learned weight's) are set to ``None`` before
  ``optimizer.step()``, so AdamW skips them entirely (no weight decay, no moment update);
* every ``report_every_steps`` all ranks call ``ray.train.report`` (metrics all-reduced); rank 0
  attaches a checkpoint every ``checkpoint_every_steps`` and at the end (the last one also holds
  the exported ``model.pt``).

Fault injection for tests: ``MUST_RAY_FAIL_AT_STEP=K`` makes the worker of rank
``MUST_RAY_FAIL_RANK`` (default 0) ``os._exit(1)`` right after step K, once: it first creates the
marker file ``MUST_RAY_FAIL_MARKER`` (default ``<out_dir>/.fault_injected_step<K>``) and does
nothing when the marker exists; it waits ``MUST_RAY_FAIL_DELAY_S`` (default two controller polls)
before exiting so that its last report is collected. Off unless the variable is set.
"""
from __future__ import annotations

import copy
import glob
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn

from must_ray.config import Config, ConfigError, TrainConfig, config_from_dict, config_to_dict, teacher_config
from must_ray.io import HISTORY_FILE, MODEL_FILE, is_uri

log = logging.getLogger("must_ray.train.driver")

ROLES = ("teacher", "student")
CHECKPOINT_FORMAT = "must-ray-train-checkpoint/1"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
FAIL_ENV = ("MUST_RAY_FAIL_AT_STEP", "MUST_RAY_FAIL_RANK", "MUST_RAY_FAIL_MARKER", "MUST_RAY_FAIL_DELAY_S")


# ----------------------------------------------------------------------------- small pieces


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.01) -> float:
    """Multiplier of the peak LR for optimiser step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then cosine decay to ``floor`` at ``total``. A pure function of the step,
    so a resumed run (even with a longer ``max_steps``) continues on the right curve."""
    warmup = max(0, min(int(warmup), max(int(total) - 1, 0)))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TaskWeighting(nn.Module):
    """Per-task loss weights. ``fixed``: ``sum_t w_t L_t`` with ``w_t = <role>.loss_weights[t]``
    (default ``tasks.<t>.loss_weight``).
    ``uncertainty`` (Kendall, Gal & Cipolla 2018): a learned log-variance ``s_t`` per task,
    ``sum_t w_t (exp(-s_t) L_t + s_t)``. One scalar parameter per task, so a task absent from a
    step can have its gradient set to ``None`` and is skipped by the optimiser."""

    def __init__(self, tasks: Sequence[str], weights: dict[str, float], mode: str = "fixed"):
        super().__init__()
        self.mode = mode
        self.tasks = list(tasks)
        self.fixed = {t: float(weights.get(t, 1.0)) for t in tasks}
        self.log_vars = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(())) for t in tasks} if mode == "uncertainty" else {})

    def forward(self, losses: dict[str, torch.Tensor], present: dict[str, bool]) -> torch.Tensor:
        total = None
        for t in self.tasks:
            loss = losses[t]
            if self.mode == "uncertainty":
                s = self.log_vars[t]
                term = (torch.exp(-s) * loss + s) if present[t] else loss + s * 0.0
            else:
                term = loss
            term = self.fixed[t] * term
            total = term if total is None else total + term
        return total

    def effective(self) -> dict[str, float]:
        """The multiplier each task's loss currently gets."""
        if self.mode == "uncertainty":
            return {t: self.fixed[t] * float(torch.exp(-self.log_vars[t].detach())) for t in self.tasks}
        return dict(self.fixed)


class TrainModule(nn.Module):
    """What DDP wraps: the model and the task weighting (so learned weights are synchronised)."""

    def __init__(self, model: nn.Module, weighting: TaskWeighting):
        super().__init__()
        self.model = model
        self.weighting = weighting

    def forward(self, images: torch.Tensor) -> dict:
        return self.model(images)


class EMA:
    """Exponential moving average of a model's state (parameters and float buffers), with the usual
    warm-up ``decay_t = min(decay, (1 + t) / (10 + t))``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        floats_e, floats_m = [], []
        for k, v in model.state_dict().items():
            e = self.state[k]
            if v.dtype.is_floating_point:
                floats_e.append(e)
                floats_m.append(v.detach())
            else:
                e.copy_(v)
        if floats_e:
            torch._foreach_lerp_(floats_e, floats_m, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if k in self.state:
                self.state[k].copy_(v)


def param_groups(module: TrainModule, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on conv/linear weights only (not biases, norms, task weights)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.startswith("weighting.") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_module(cfg: Config, tcfg: TrainConfig, task_names: Sequence[str], num_classes: int) -> tuple[dict, TrainModule]:
    """``(tasks, TrainModule)`` of a run: ``MultiTaskModel`` (backbone, FPN, one head per task) and
    the task weighting. Shared by the Ray Train worker and the benchmarks' plain PyTorch loop, so
    both train exactly the same model."""
    from must_ray.models import MultiTaskModel
    from must_ray.tasks import build_tasks

    tasks = build_tasks(list(task_names), num_classes, cfg.tasks)
    mcfg = tcfg.model
    model = MultiTaskModel(mcfg.backbone, tasks, fpn_channels=mcfg.fpn_channels, pretrained=mcfg.pretrained,
                           weights_path=mcfg.backbone_weights)
    weights = {t: tcfg.loss_weights.get(t, cfg.tasks[t].loss_weight if t in cfg.tasks else 1.0) for t in task_names}
    weighting = TaskWeighting(task_names, weights, tcfg.task_weighting)
    return tasks, TrainModule(model, weighting)


def build_optimizer(raw: TrainModule, tcfg: TrainConfig, total_steps: int):
    """``(AdamW, LambdaLR)``: decay on conv/linear weights only, warm-up + cosine over ``total_steps``."""
    optimizer = torch.optim.AdamW(param_groups(raw, tcfg.weight_decay), lr=tcfg.lr, betas=(0.9, 0.999))
    warmup = int(tcfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))
    return optimizer, scheduler


def train_step(raw: TrainModule, wrapped: nn.Module, tasks: dict, images_u8: torch.Tensor, targets: dict,
               present: dict[str, bool], optimizer, scheduler, *, grad_clip: float = 0.0, ema: Optional[EMA] = None,
               step: int = 0, channels_last: bool = False, autocast=None) -> tuple[torch.Tensor, dict]:
    """One optimiser step on a collated batch: forward (``wrapped``: DDP or the module itself), masked
    per-task losses, weighting, backward, absent tasks' gradients dropped (AdamW skips them),
    clipping, optimiser + scheduler step, EMA. ``present[t]``: the *global* batch has a label for
    ``t`` (absent heads run in eval mode). Returns ``(total loss, {task: loss})``. The one step
    of the Ray Train worker and of the benchmarks' plain loop."""
    from contextlib import nullcontext

    from must_ray.models import images_to_tensor

    task_names = list(tasks)
    for t in task_names:  # absent heads: eval mode, so their BatchNorm statistics stay put
        raw.model.heads[t].train(present[t])
    device = next(raw.parameters()).device
    images = images_to_tensor(images_u8, device=device, channels_last=channels_last)
    with (autocast() if autocast is not None else nullcontext()):
        outputs = wrapped(images)
    losses = {t: tasks[t].loss(outputs[t], targets[t]) for t in task_names}
    total = raw.weighting(losses, present)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    for t in task_names:
        if not present[t]:
            for p in raw.model.heads[t].parameters():
                p.grad = None
            if t in raw.weighting.log_vars:
                raw.weighting.log_vars[t].grad = None
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.grad is not None], grad_clip)
    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update(raw.model, step)
    return total, losses


def _fault_settings(out_dir: str) -> Optional[dict]:
    raw = os.environ.get(FAIL_ENV[0])
    if not raw:
        return None
    step = int(raw)
    poll = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))
    return {"step": step, "rank": int(os.environ.get(FAIL_ENV[1], "0")),
            "marker": os.environ.get(FAIL_ENV[2]) or os.path.join(out_dir, f".fault_injected_step{step}"),
            "delay_s": float(os.environ.get(FAIL_ENV[3], 2 * poll + 0.5))}


def _maybe_inject_fault(fault: Optional[dict], step: int, rank: int) -> None:
    if not fault or step != fault["step"] or rank != fault["rank"] or os.path.exists(fault["marker"]):
        return
    os.makedirs(os.path.dirname(os.path.abspath(fault["marker"])), exist_ok=True)
    with open(fault["marker"], "w") as f:
        f.write(f"worker rank {rank} killed itself after step {step} (pid {os.getpid()})\n")
    _say(f"[must-ray] fault injection: rank {rank} exits after step {step}")
    # Ray Train collects what workers reported when it polls them (every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); wait that long so the checkpoint reported before the
    # fault is registered and the restart point is deterministic.
    time.sleep(fault["delay_s"])
    os._exit(1)


def _say(message: str) -> None:
    """One progress line on stderr. (Not ``print``: Ray Train V2 patches ``print`` in workers and,
    with Ray's redirected streams, emits every line twice.)"""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def default_storage_path(cfg: Config, tcfg: TrainConfig) -> str:
    """``TrainConfig.storage_path`` or ``<paths.root>/ray_results``, absolute (Ray needs that).
    The default under a relative ``paths.root`` is refused in a job submitted with a working dir
    (it would be Ray's temporary copy; ``cli.load_job_config`` checks an explicit storage_path)."""
    from must_ray.storage import check_job_output_paths

    if not tcfg.storage_path:
        check_job_output_paths([("paths.root", cfg.paths.root)])
    path = tcfg.storage_path or os.path.join(cfg.paths.root, "ray_results")
    return path if is_uri(path) else os.path.abspath(path)


def default_run_name(cfg: Config, role: str, tasks: Sequence[str]) -> str:
    return f"{cfg.name}-teacher-{tasks[0]}" if role == "teacher" else f"{cfg.name}-student"


def latest_checkpoint_meta(experiment_dir: str) -> Optional[dict]:
    """The ``meta.json`` of the newest checkpoint under a (local) run directory, if any."""
    best = None
    for path in glob.glob(os.path.join(experiment_dir, "checkpoint_*", META_FILE)):
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if best is None or meta.get("step", -1) > best.get("step", -1):
            best = meta
    return best


# ----------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(lc: dict) -> None:
    """The Ray Train worker function (``lc``: the loop config :func:`train` builds)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from must_ray.models import load_matching_weights, save_model
    from must_ray.monitoring import TrainMetrics
    from must_ray.train.collate import TrainCollate, batch_to_device, split_batch

    t_start = time.time()
    cfg = config_from_dict(lc["config"])
    role = lc["role"]
    tcfg: TrainConfig = getattr(cfg, role)
    task_names: list[str] = list(lc["tasks"])
    classes: list[str] = list(lc["classes"])
    num_classes = len(classes)
    image_size = int(lc["image_size"])

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = on_gpu and tcfg.precision in ("auto", "bf16")
    channels_last = bool(tcfg.channels_last)

    # -------------------------------------------------------------- model + restore
    torch.manual_seed(tcfg.seed)
    mcfg = tcfg.model
    tasks, module = build_module(cfg, tcfg, task_names, num_classes)
    model, weighting = module.model, module.weighting

    state: Optional[dict] = None
    restore_s = 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        t0 = time.time()
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            history_path = os.path.join(d, HISTORY_FILE)
            history = [json.loads(line) for line in open(history_path)] if os.path.exists(history_path) else []
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"checkpoint {checkpoint.path} is not a must-ray training checkpoint")
        if list(state["tasks"]) != task_names or list(state["classes"]) != classes:
            raise RuntimeError(
                f"run {lc['run_name']!r} has a checkpoint for tasks {state['tasks']} / classes {state['classes']}, "
                f"this submission asks for {task_names} / {classes}: use another run name or delete "
                f"{lc['experiment_dir']}")
        model.load_state_dict(state["model"])
        weighting.load_state_dict(state["weighting"])
        restore_s = time.time() - t0
    else:
        history = []
        if mcfg.init_checkpoint:
            counts = load_matching_weights(model, mcfg.init_checkpoint)
            if rank == 0:
                _say(f"[{lc['run_name']}] initialised from {mcfg.init_checkpoint}: {counts}")

    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    wrapped = ray.train.torch.prepare_model(module)
    raw: TrainModule = wrapped.module if isinstance(getattr(wrapped, "module", None), TrainModule) else wrapped

    # -------------------------------------------------------------- schedule
    global_batch = int(tcfg.global_batch_size)
    per_worker = global_batch // world
    eff_batch = per_worker * world
    num_rows = int(lc["num_rows"])
    steps_per_epoch = (num_rows // world) // per_worker
    if steps_per_epoch < 1:
        raise ValueError(f"{num_rows} rows are fewer than one global batch of {global_batch} images "
                         f"({world} workers x {per_worker})")
    total_steps = int(tcfg.max_steps) if tcfg.max_steps else int(tcfg.epochs) * steps_per_epoch
    optimizer, scheduler = build_optimizer(raw, tcfg, total_steps)
    ema = EMA(raw.model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None

    step = epoch = step_in_epoch = 0
    attempts: list[dict] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        step, epoch, step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        attempts = [dict(a) for a in state.get("attempts", [])]
        if step_in_epoch >= steps_per_epoch:  # the group size changed the epoch length
            epoch, step_in_epoch = epoch + 1, 0
    attempts.append({"start_step": step, "world_size": world, "restore_s": round(restore_s, 3),
                     "startup_s": None, "time": time.time()})
    state = None  # free the restored tensors

    if rank == 0:
        note = f"resumed at step {step} (restore {restore_s:.2f}s)" if step or checkpoint is not None else "new run"
        _say(f"[{lc['run_name']}] {role} tasks={task_names} workers={world} batch={eff_batch} "
              f"({per_worker}/worker) steps={total_steps} ({steps_per_epoch}/epoch) device={device} {note}")
        if eff_batch != global_batch:
            _say(f"[{lc['run_name']}] warning: global_batch_size {global_batch} is not divisible by {world} "
                  f"workers; each step uses {eff_batch} images")

    shard = ray.train.get_dataset_shard("train")
    fault = lc.get("fault")

    def autocast():  # bf16 autocast on GPU (no GradScaler needed); fp32 on CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)

    n_tasks = len(task_names)

    # -------------------------------------------------------------- report / checkpoint
    win = {"t": time.time(), "steps": 0, "wait": 0.0,
           "loss": torch.zeros(n_tasks, dtype=torch.float64, device=device),
           "n": torch.zeros(n_tasks, dtype=torch.float64),
           "total": torch.zeros((), dtype=torch.float64, device=device)}

    def export_model(path: str) -> None:
        target = raw.model
        if ema is not None:
            target = copy.deepcopy(raw.model)
            target.load_state_dict(ema.state)
        save_model(path, target, num_classes=num_classes, task_cfgs=cfg.tasks, classes=classes, image_size=image_size,
                   fpn_channels=mcfg.fpn_channels,
                   extra={"role": role, "run_name": lc["run_name"], "step": step, "ema": ema is not None,
                          "data": list(lc["data"])})

    done = {"final": False}
    # Ray metrics (dashboard / Prometheus): rank 0 only, its report values are already global
    dash = TrainMetrics(lc["run_name"], role) if rank == 0 else None

    def report(final: bool) -> None:
        done["final"] = done["final"] or final
        stats = torch.cat([win["loss"].cpu(), win["n"], win["total"].cpu().view(1),
                           torch.tensor([win["wait"]], dtype=torch.float64)])
        if world > 1:
            stats = stats.to(device)
            dist.all_reduce(stats)
            stats = stats.cpu()
        losses, counts = stats[:n_tasks], stats[n_tasks:2 * n_tasks]
        elapsed = max(time.time() - win["t"], 1e-9)
        metrics: dict[str, Any] = {
            "step": step, "epoch": epoch, "total_steps": total_steps, "world_size": world, "global_batch": eff_batch,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": float(stats[2 * n_tasks]) / max(win["steps"] * world, 1),
            "images_per_s": win["steps"] * eff_batch / elapsed,
            "data_wait_frac": float(stats[2 * n_tasks + 1]) / world / elapsed,
            "time": time.time(),
        }
        for i, t in enumerate(task_names):
            metrics[f"loss_{t}"] = float(losses[i] / counts[i]) if counts[i] > 0 else None
        if tcfg.task_weighting == "uncertainty":
            metrics.update({f"weight_{t}": w for t, w in raw.weighting.effective().items()})
        if win["steps"] or not history or history[-1]["step"] != step:
            history.append(metrics)
        if rank == 0 and win["steps"]:
            parts = " ".join(f"{t}={metrics[f'loss_{t}']:.4f}" for t in task_names if metrics[f"loss_{t}"] is not None)
            _say(f"[{lc['run_name']}] step {step}/{total_steps} epoch {epoch} loss {metrics['loss']:.4f} ({parts}) "
                  f"lr {metrics['lr']:.2e} {metrics['images_per_s']:.1f} img/s x{world}")
        if dash is not None:
            dash.report(metrics, task_names, steps=win["steps"])
        win.update(t=time.time(), steps=0, wait=0.0)
        for key in ("loss", "n", "total"):
            win[key].zero_()

        want_ckpt = final or step % tcfg.checkpoint_every_steps == 0
        if not want_ckpt or rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="must_ray_ckpt_") as tmp:
            payload = {
                "format": CHECKPOINT_FORMAT, "role": role, "tasks": task_names, "classes": classes,
                "config": lc["config"], "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "model": {k: v.detach().cpu() for k, v in raw.model.state_dict().items()},
                "weighting": {k: v.detach().cpu() for k, v in raw.weighting.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": None,  # bf16 autocast needs no GradScaler
                "ema": ema.state_dict() if ema is not None else None,
                "attempts": attempts,
            }
            torch.save(payload, os.path.join(tmp, STATE_FILE))
            meta = {k: payload[k] for k in ("format", "role", "tasks", "classes", "step", "epoch", "step_in_epoch",
                                            "attempts")}
            meta.update(backbone=mcfg.backbone, final=final, total_steps=total_steps, run_name=lc["run_name"],
                        data=list(lc["data"]), rows=num_rows)
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f)
            with open(os.path.join(tmp, HISTORY_FILE), "w") as f:
                for m in history:
                    f.write(json.dumps(m) + "\n")
            if final:
                export_model(os.path.join(tmp, MODEL_FILE))
            name = f"checkpoint_step{step:08d}_a{len(attempts) - 1}{'_final' if final else ''}"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        if dash is not None:
            dash.checkpointed()

    # -------------------------------------------------------------- train
    wrapped.train()
    first_step_logged = False
    while step < total_steps:
        collate = TrainCollate(task_names, num_classes, cfg.tasks, image_size=image_size, augment=tcfg.augment,
                               crop_scale_min=tcfg.crop_scale_min, seed=tcfg.seed, epoch=epoch)
        iterator = iter(shard.iter_torch_batches(
            batch_size=per_worker, collate_fn=collate, drop_last=True, prefetch_batches=tcfg.prefetch_batches,
            local_shuffle_buffer_size=tcfg.shuffle_buffer or None,
            local_shuffle_seed=(tcfg.seed * 1_000_003 + epoch * 1009 + rank) % 2**31, device="cpu"))
        exhausted = False
        while step < total_steps and step_in_epoch < steps_per_epoch:
            t0 = time.time()
            batch = next(iterator, None)
            win["wait"] += time.time() - t0
            # labelled rows per task, counted on the host (masks are still CPU tensors here)
            if batch is None:
                counts = torch.zeros(n_tasks + 1, dtype=torch.float32)
            else:
                counts = torch.tensor([float(batch[f"{t}/mask"].sum()) for t in task_names] + [1.0])
                local = (counts[:n_tasks] > 0).double()
                images_u8, targets = split_batch(batch_to_device(batch, device))
            if world > 1:  # global label counts (and whether every rank still has data): one tiny all-reduce
                counts = counts.to(device)
                dist.all_reduce(counts)
                counts = counts.cpu()
            if batch is None or int(counts[-1]) < world:
                exhausted = True
                break
            present = {t: bool(counts[i] > 0) for i, t in enumerate(task_names)}
            total, losses = train_step(raw, wrapped, tasks, images_u8, targets, present, optimizer, scheduler,
                                       grad_clip=tcfg.grad_clip, ema=ema, step=step, channels_last=channels_last,
                                       autocast=autocast)
            step += 1
            step_in_epoch += 1

            with torch.no_grad():  # accumulated on the device: no host sync until the next report
                win["total"] += total.detach().double()
                win["loss"] += torch.stack([losses[t].detach().double() for t in task_names]) * local.to(device)
                win["n"] += local
            win["steps"] += 1
            if not first_step_logged:
                attempts[-1]["startup_s"] = round(time.time() - t_start, 3)
                first_step_logged = True
            final = step >= total_steps
            if final or step % tcfg.report_every_steps == 0 or step % tcfg.checkpoint_every_steps == 0:
                report(final)
            _maybe_inject_fault(fault, step, rank)
        if exhausted and step_in_epoch == 0:
            raise RuntimeError(f"the training shard yielded no full batch of {per_worker} rows in epoch {epoch}")
        if exhausted or step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        del iterator
    for t in task_names:
        raw.model.heads[t].train(True)
    if not done["final"]:
        # nothing left to train (a re-submitted run that was already complete): report once more
        # so that the final checkpoint, and with it the exported model, exist for this submission
        report(final=True)


# ----------------------------------------------------------------------------- driver


def _resolve(cfg: Config, role: str, data: Optional[Sequence[str]], tasks: Optional[Sequence[str]]):
    from must_ray.table import table_classes, table_rows, table_tasks

    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
    tcfg: TrainConfig = getattr(cfg, role)
    data = [str(p) for p in (data or tcfg.data)]
    if not data:
        raise ConfigError(f"{role}.data: no training tables given")
    for p in data:
        if not is_uri(p) and not os.path.exists(p):
            raise ConfigError(f"{role}.data: table not found: {p}")
    present = table_tasks(data)
    names = list(tasks or tcfg.tasks or present)
    if not names:
        raise ConfigError(f"{role}: the tables {data} hold no task columns")
    missing = [t for t in names if t not in present]
    if missing:
        raise ConfigError(f"{role}.tasks: {missing} have no labels in {data} (tables hold {present})")
    if role == "teacher" and len(names) != 1:
        raise ConfigError(f"teacher.tasks: a teacher trains exactly one task, got {names}")
    classes = table_classes(data)
    rows = sum(table_rows(p) for p in data)
    return tcfg, data, names, classes, rows


def train(cfg: Config, role: str, data: Optional[Sequence[str]] = None, tasks: Optional[Sequence[str]] = None,
          out_dir: Optional[str] = None, run_name: Optional[str] = None) -> dict[str, Any]:
    """Train a teacher (``role="teacher"``, one task) or the student (``role="student"``) with
    Ray Train on the examples tables ``data`` (default ``cfg.<role>.data``); ``tasks`` default to
    ``cfg.<role>.tasks`` or every task with a presence column in the tables. Writes
    ``<out_dir>/model.pt`` (EMA weights when EMA is on), ``metrics.jsonl`` and ``summary.json``
    and returns the summary. A run whose name already has checkpoints under the storage path
    resumes from its latest checkpoint. Needs a connected Ray (``must_ray.cli.init_ray``)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from must_ray.table import tables_bytes
    from must_ray.train.dataset import cache_in_object_store, read_tables

    t_start = time.time()
    if role == "teacher" and tasks and len(tasks) == 1:
        cfg = teacher_config(cfg, tasks[0])  # that teacher's recipe (teacher.per_task)
    tcfg, data, names, classes, rows = _resolve(cfg, role, data, tasks)
    image_size = int(tcfg.image_size or cfg.world.image_size)
    if out_dir is None:
        out_dir = cfg.paths.resolve("teachers") + f"/{names[0]}" if role == "teacher" else cfg.paths.resolve("student")
    out_dir = str(out_dir) if is_uri(str(out_dir)) else os.path.abspath(out_dir)
    # the driver writes the outputs into `stage`; for a URI out_dir they are uploaded at the end
    stage = tempfile.mkdtemp(prefix="must_ray_out_") if is_uri(out_dir) else out_dir
    os.makedirs(stage, exist_ok=True)
    run_name = run_name or tcfg.run_name or default_run_name(cfg, role, names)
    storage = default_storage_path(cfg, tcfg)
    experiment_dir = f"{storage.rstrip('/')}/{run_name}"
    _check_shared(storage, f"{role}.storage_path")
    _check_shared(out_dir, "--out")

    resumed_from = None
    if not is_uri(storage):
        os.makedirs(storage, exist_ok=True)
        meta = latest_checkpoint_meta(experiment_dir)
        if meta is not None:
            if list(meta.get("tasks", [])) != names or list(meta.get("classes", [])) != classes \
                    or meta.get("backbone") != tcfg.model.backbone:
                raise ConfigError(
                    f"run {run_name!r} in {storage} was trained with tasks {meta.get('tasks')}, "
                    f"backbone {meta.get('backbone')!r}; this submission has tasks {names}, backbone "
                    f"{tcfg.model.backbone!r}. Choose another --run-name or delete {experiment_dir}")
            resumed_from = int(meta["step"])
            log.info("run %s: resuming from its checkpoint at step %d (%s)", run_name, resumed_from, experiment_dir)
            if meta.get("data") is not None and (list(meta["data"]) != data or meta.get("rows") != rows):
                log.warning("run %s was trained on %s (%s rows); it now continues on %s (%s rows). Use a new "
                            "--run-name to train from scratch on the new data", run_name, meta["data"],
                            meta.get("rows"), data, rows)

    lo, hi = tcfg.num_workers
    cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
    if not tcfg.use_gpu and cluster_cpus and hi * tcfg.cpus_per_worker + tcfg.read_cpus > cluster_cpus + 1e-9:
        log.warning("%d workers x %.2f CPUs + %.2f CPU for reading exceeds the cluster's %.0f CPUs: the elastic "
                    "group may take every CPU and starve the data readers; lower %s.cpus_per_worker",
                    hi, tcfg.cpus_per_worker, tcfg.read_cpus, cluster_cpus, role)

    dataset = read_tables(data, names, seed=tcfg.seed, read_cpus=tcfg.read_cpus)
    size = tables_bytes(data)
    store = float(ray.cluster_resources().get("object_store_memory", 0)) or float("inf")
    cached = size <= min(tcfg.cache_max_mb * 2**20, store / 4)
    if cached:
        lo_batch = max(1, tcfg.global_batch_size // hi)
        dataset = cache_in_object_store(dataset, rows, block_rows=max(lo_batch, 32), seed=tcfg.seed)
    loop_config = {
        "config": config_to_dict(cfg), "role": role, "tasks": names, "classes": classes, "num_rows": rows,
        "image_size": image_size, "run_name": run_name, "data": data, "experiment_dir": experiment_dir,
        "fault": _fault_settings(stage), "cached": cached,
    }
    from ray.data import ExecutionOptions

    options = ray.train.DataConfig.default_ingest_options()
    ingest = ExecutionOptions(resource_limits=options.resource_limits, exclude_resources=options.exclude_resources,
                              preserve_order=False, verbose_progress=False)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(lo, hi) if lo < hi else lo, use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": tcfg.cpus_per_worker, **({"GPU": 1} if tcfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.num_to_keep)),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    t_fit = time.time()
    result = trainer.fit()
    fit_s = time.time() - t_fit
    if getattr(result, "error", None):
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name!r} finished without a checkpoint")

    model_path = os.path.join(stage, MODEL_FILE)
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
        if not os.path.exists(os.path.join(d, MODEL_FILE)):
            raise RuntimeError(f"the final checkpoint of {run_name!r} ({result.checkpoint.path}) has no {MODEL_FILE}")
        tmp = f"{model_path}.tmp-{os.getpid()}"
        shutil.copyfile(os.path.join(d, MODEL_FILE), tmp)
        os.replace(tmp, model_path)
        history_src = os.path.join(d, HISTORY_FILE)
        history = [json.loads(line) for line in open(history_src)] if os.path.exists(history_src) else []
    with open(os.path.join(stage, HISTORY_FILE), "w") as f:
        for m in history:
            f.write(json.dumps(m) + "\n")

    last = history[-1] if history else {}
    speeds = [m["images_per_s"] for m in history if m.get("images_per_s")]
    summary = {
        "job": f"train_{role}", "role": role, "run_name": run_name, "tasks": names, "classes": classes,
        "data": data, "rows": rows, "steps": meta["step"], "epochs": meta["epoch"], "total_steps": meta["total_steps"],
        "final_losses": {k[5:]: v for k, v in last.items() if k.startswith("loss_")},
        "loss": last.get("loss"), "images_per_s": (sum(speeds) / len(speeds)) if speeds else None,
        "world_size": last.get("world_size"), "global_batch": last.get("global_batch"), "cached_input": cached,
        "attempts": meta["attempts"], "resumed_from": resumed_from,
        "checkpoint": result.checkpoint.path, "experiment_dir": experiment_dir, "storage_path": storage,
        "model": f"{out_dir.rstrip('/')}/{MODEL_FILE}", "metrics": f"{out_dir.rstrip('/')}/{HISTORY_FILE}",
        "out_dir": out_dir,
        "fit_s": round(fit_s, 2), "wall_s": round(time.time() - t_start, 2),
    }
    with open(os.path.join(stage, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    if stage != out_dir:  # upload to the URI (s3://, gs://, ...)
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(out_dir)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(stage, path, destination_filesystem=fs)
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _check_shared(location: str, key: str) -> None:
    """On a multi-node cluster, refuse node-local storage / output paths (see must_ray.storage)."""
    from must_ray.storage import MULTI_NODE_ENV, check_shared_storage, cluster_node_count

    nodes = cluster_node_count()
    if nodes <= 1 and os.environ.get(MULTI_NODE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        nodes = 2
    check_shared_storage(location, nodes, key=key)


# ----------------------------------------------------------------------------- job helpers


def add_train_flags(parser) -> None:
    """The plain flags both training jobs share (each becomes a ``--set <role>.<key>=...``)."""
    parser.add_argument("--data", action="append", metavar="TABLE",
                        help="examples table (Parquet dir/file/URI) to train on; repeatable (tables are unioned, "
                             "missing task columns read as unlabelled)")
    parser.add_argument("--out", metavar="DIR", help="where model.pt, metrics.jsonl and summary.json go")
    parser.add_argument("--steps", type=int, metavar="N", help="optimiser steps (sets <role>.max_steps)")
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs when --steps is not given")
    parser.add_argument("--workers", metavar="MIN[,MAX]",
                        help="Ray Train workers; MIN,MAX makes the group elastic (e.g. 1,4)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="global batch size (all workers together)")
    parser.add_argument("--run-name", metavar="NAME",
                        help="Ray Train run name; re-submitting the same name resumes that run")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")


def train_flag_overrides(args, role: str) -> list[str]:
    """``--set`` strings for the plain flags that were given."""
    out = []
    if args.steps is not None:
        out.append(f"{role}.max_steps={args.steps}")
    if args.epochs is not None:
        out.append(f"{role}.epochs={args.epochs}")
    if args.workers:
        parts = [p.strip() for p in str(args.workers).split(",") if p.strip()]
        if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"--workers: expected MIN or MIN,MAX (integers), got {args.workers!r}")
        lo, hi = int(parts[0]), int(parts[-1])
        out.append(f"{role}.num_workers=[{lo}, {hi}]")
    if args.batch_size is not None:
        out.append(f"{role}.global_batch_size={args.batch_size}")
    if args.run_name:
        out.append(f"{role}.run_name={args.run_name}")
    if args.gpu:
        out.append(f"{role}.use_gpu=true")
    return out
