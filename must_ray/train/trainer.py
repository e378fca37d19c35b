"""The Ray Train worker: one :class:`Trainer` per worker process trains the run's model.

The shape is torchtitan's: the run's state lives on the Trainer (model, optimiser, scheduler,
EMA, step counters, report history), built or restored once, then small methods do the work:
:meth:`Trainer.train` runs the epochs, :meth:`Trainer.train_epoch` one pass over the shard,
:meth:`Trainer.train_step` one optimiser step, :meth:`Trainer.report` the metrics (every rank)
and :meth:`Trainer.checkpoint` + :meth:`Trainer.export` on rank 0. :func:`train_loop_per_worker`,
the function Ray Train runs in every worker, builds a Trainer and calls ``train()``.

What a step does (docs/training.md): AdamW, linear warm-up + cosine schedule, masked per-task
losses weighted fixed or by uncertainty, gradient clipping, optional EMA of the weights, bf16
autocast (``precision``; by default on GPU and on CPUs with native bf16) and channels_last. A task
with no labelled row in the *global* batch is not touched: its head runs in eval mode, its loss is
a zero connected to the graph (DDP sees every parameter used) and its gradients are dropped, so
AdamW skips it entirely.

``RunSpec.step_hooks`` are callables ``hook(trainer)`` run on every rank after each step (after
that step's report and checkpoint); the tests use one to kill a worker mid-run (tests/faults.py).
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from must_ray.config import config_from_dict
from must_ray.io import MODEL_FILE
from must_ray.models import load_matching_weights, save_model
from must_ray.models.precision import autocast, resolve_precision
from must_ray.monitoring import TrainMetrics
from must_ray.train.checkpoint import CHECKPOINT_FORMAT, checkpoint_dir_name, read_checkpoint, write_checkpoint
from must_ray.train.collate import TrainCollate, batch_to_device, split_batch
from must_ray.train.optim import build_ema, build_optimizer, ema_state
from must_ray.train.step import TrainModule, build_module, train_step
from must_ray.train.window import ReportWindow

StepHook = Callable[["Trainer"], None]


@dataclass
class RunSpec:
    """What the driver resolved for one run and every worker receives (picklable): the config as
    a plain dict, the run's tasks and class vocabulary, the rows of its dataset, and its identity."""

    config: dict
    role: str
    tasks: list[str]
    classes: list[str]
    num_rows: int
    image_size: int
    run_name: str
    data: list[str]
    experiment_dir: str
    cached: bool = False
    step_hooks: list[StepHook] = field(default_factory=list)
    submission: str = ""  # the driver's id of this submission, recorded in every attempt it starts


def say(message: str) -> None:
    """One progress line on stderr. (Not ``print``: Ray Train V2 patches ``print`` in workers and,
    with Ray's redirected streams, emits every line twice.)"""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def seed_everything(seed: int, rank: int) -> None:
    """Seed torch with the run's ``seed`` (every rank builds the same initial model) and Python's and
    NumPy's global generators with ``seed + rank`` (nothing in the loop draws from them; code a
    user plugs in, e.g. a task's loss, then still reproduces)."""
    torch.manual_seed(seed)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def train_loop_per_worker(loop_config: dict) -> None:
    """The Ray Train worker function (``loop_config["run"]``: the :class:`RunSpec`)."""
    Trainer.in_ray_worker(loop_config["run"]).train()


class Trainer:
    """One worker's share of a run. Construct, then :meth:`build` (fresh or from a checkpoint's
    state), then :meth:`train`; :meth:`in_ray_worker` does all three inside Ray Train.

    Outside Ray Train (``rank=0, world=1``, no ``wrap``) a Trainer can be built and stepped on
    collated batches directly (:meth:`train_step`), which is how the tests check a restore."""

    def __init__(self, run: RunSpec, *, rank: int = 0, world: int = 1, device: Optional[torch.device] = None,
                 wrap: Optional[Callable[[nn.Module], nn.Module]] = None):
        self.t_start = time.time()
        self.run = run
        self.cfg = config_from_dict(run.config)
        self.tcfg = getattr(self.cfg, run.role)
        self.task_names: list[str] = list(run.tasks)
        self.classes: list[str] = list(run.classes)
        self.rank, self.world = rank, world
        self.device = device if device is not None else torch.device("cpu")
        self.hooks: list[StepHook] = list(run.step_hooks)
        self._wrap = wrap
        self._configure_torch()
        self.global_batch = int(self.tcfg.global_batch_size)
        self.per_worker = self.global_batch // world
        self.batch_size = self.per_worker * world  # the images one step uses (the global batch when divisible)
        self.steps_per_epoch = (int(run.num_rows) // world) // self.per_worker
        if self.steps_per_epoch < 1:
            raise ValueError(f"{run.num_rows} rows are fewer than one global batch of {self.global_batch} images "
                             f"({world} workers x {self.per_worker})")
        schedule = self.tcfg.schedule
        self.total_steps = int(schedule.max_steps or schedule.epochs * self.steps_per_epoch)
        self.step = self.epoch = self.step_in_epoch = 0
        self.history: list[dict] = []
        self.attempts: list[dict] = []
        self.final_reported = False
        self.window = ReportWindow(self.task_names, self.device)
        # Ray metrics (dashboard / Prometheus): rank 0 only, its report values are already global
        self.dashboard: Optional[TrainMetrics] = None

    # ------------------------------------------------------------------------- build / restore

    @classmethod
    def in_ray_worker(cls, run: RunSpec) -> "Trainer":
        """This Ray Train worker's Trainer: rank, world size and device from the train context,
        the model wrapped by ``prepare_model`` (DDP when more than one worker), restored from
        ``ray.train.get_checkpoint()`` when the run has one."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device()
        if isinstance(device, list):
            device = device[0]
        trainer = cls(run, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
                      wrap=ray.train.torch.prepare_model)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            trainer.build()
        else:
            t0 = time.time()
            state, history = read_checkpoint(checkpoint)
            trainer.build(state, history, restore_s=time.time() - t0)
        if trainer.rank == 0:
            trainer.dashboard = TrainMetrics(run.run_name, run.role)
        return trainer

    def _configure_torch(self) -> None:
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            torch.set_num_threads(max(1, int(self.tcfg.scaling.cpus_per_worker)))

    def build(self, state: Optional[dict] = None, history: Sequence[dict] = (), restore_s: float = 0.0) -> None:
        """The model (seeded), optimiser, scheduler and EMA of the run; restored from ``state``
        (a checkpoint's :meth:`state_dict`) and its report ``history`` when given, else fresh
        (or initialised from ``model.init_checkpoint``)."""
        seed_everything(self.tcfg.seed, self.rank)
        self.tasks, module = build_module(self.cfg, self.tcfg, self.task_names, len(self.classes))
        if state is not None:
            self._check_state(state)
            module.model.load_state_dict(state["model"])
            module.weighting.load_state_dict(state["weighting"])
        elif self.tcfg.model.init_checkpoint:
            counts = load_matching_weights(module.model, self.tcfg.model.init_checkpoint)
            if self.rank == 0:
                say(f"[{self.run.run_name}] initialised from {self.tcfg.model.init_checkpoint}: {counts}")
        if self.tcfg.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.wrapped = self._wrap(module) if self._wrap is not None else module
        inner = getattr(self.wrapped, "module", None)
        self.module: TrainModule = inner if isinstance(inner, TrainModule) else self.wrapped
        self.optimizer, self.scheduler = build_optimizer(self.module, self.tcfg, self.total_steps)
        self.ema = build_ema(self.module.model, self.tcfg.ema_decay)
        self.history = list(history)
        if state is not None:
            self._restore_progress(state)
        self.attempts.append({"start_step": self.step, "world_size": self.world, "restore_s": round(restore_s, 3),
                              "startup_s": None, "time": time.time(), "submission": self.run.submission,
                              "restored_step": int(state["step"]) if state is not None else None})
        self._announce(restored=state is not None, restore_s=restore_s)

    def _check_state(self, state: dict) -> None:
        if list(state["tasks"]) != self.task_names or list(state["classes"]) != self.classes:
            raise RuntimeError(
                f"run {self.run.run_name!r} has a checkpoint for tasks {state['tasks']} / classes {state['classes']}, "
                f"this submission asks for {self.task_names} / {self.classes}: use another run name or delete "
                f"{self.run.experiment_dir}")

    def _restore_progress(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema"):
            self.ema.module.load_state_dict(state["ema"])
        self.step, self.epoch, self.step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        self.attempts = [dict(a) for a in state.get("attempts", [])]
        if self.step_in_epoch >= self.steps_per_epoch:  # the group size changed the epoch length
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _announce(self, restored: bool, restore_s: float) -> None:
        if self.rank != 0:
            return
        name = self.run.run_name
        note = f"resumed at step {self.step} (restore {restore_s:.2f}s)" if self.step or restored else "new run"
        say(f"[{name}] {self.run.role} tasks={self.task_names} workers={self.world} batch={self.batch_size} "
            f"({self.per_worker}/worker) steps={self.total_steps} ({self.steps_per_epoch}/epoch) device={self.device} "
            f"{note}")
        if self.batch_size != self.global_batch:
            say(f"[{name}] warning: global_batch_size {self.global_batch} is not divisible by {self.world} "
                f"workers; each step uses {self.batch_size} images")

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs, tensors on the CPU (the checkpoint's ``state.pt``)."""
        return {
            "format": CHECKPOINT_FORMAT, "role": self.run.role, "tasks": self.task_names, "classes": self.classes,
            "config": self.run.config, "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "model": {k: v.detach().cpu() for k, v in self.module.model.state_dict().items()},
            "weighting": {k: v.detach().cpu() for k, v in self.module.weighting.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no GradScaler
            "ema": ema_state(self.ema) if self.ema is not None else None,
            "attempts": self.attempts,
        }

    # ------------------------------------------------------------------------- training

    def train(self, shard=None) -> None:
        """Train from where the run stands to ``total_steps``, epoch after epoch, on ``shard``
        (default: this worker's ``train`` dataset shard); the last step's report carries the
        final checkpoint."""
        if shard is None:
            import ray.train

            shard = ray.train.get_dataset_shard("train")
        self.window.reset()
        self.wrapped.train()
        while self.step < self.total_steps:
            self.train_epoch(shard)
        for t in self.task_names:
            self.module.model.heads[t].train(True)
        if not self.final_reported:
            # nothing left to train (a re-submitted run that was already complete): report once more
            # so that the final checkpoint, and with it the exported model, exist for this submission
            self.report(final=True)

    @property
    def collate_in_step(self) -> bool:
        """Whether batches are collated in the training thread (``input.collate``; auto: on a CPU
        worker whose intra-op pool has more than one thread, which a background collate thread
        would compete with: every parallel region waits for its slowest thread)."""
        where = self.tcfg.input.collate
        if where == "auto":
            return self.device.type == "cpu" and torch.get_num_threads() > 1
        return where == "step"

    def batches(self, shard):
        """This epoch's batches of the shard, shuffled locally with a seed of (run seed, epoch,
        rank) and collated (decode, augment, stack) in Ray Data's prefetch threads or in this
        thread (:attr:`collate_in_step`)."""
        inp, seed = self.tcfg.input, self.tcfg.seed
        collate = TrainCollate(self.task_names, len(self.classes), self.cfg.tasks, image_size=self.run.image_size,
                               augment=inp.augment, crop_scale_min=inp.crop_scale_min, seed=seed, epoch=self.epoch)
        options = dict(batch_size=self.per_worker, drop_last=True, prefetch_batches=inp.prefetch_batches,
                       local_shuffle_buffer_size=inp.shuffle_buffer or None,
                       local_shuffle_seed=(seed * 1_000_003 + self.epoch * 1009 + self.rank) % 2**31)
        if self.collate_in_step:
            return (collate(batch) for batch in shard.iter_batches(batch_format="pyarrow", **options))
        return iter(shard.iter_torch_batches(collate_fn=collate, device="cpu", **options))

    def train_epoch(self, shard) -> None:
        """Steps until the epoch (or the run) ends; every rank stops together when any rank's
        shard runs out."""
        iterator = self.batches(shard)
        exhausted = False
        while self.step < self.total_steps and self.step_in_epoch < self.steps_per_epoch:
            t0 = time.time()
            batch = next(iterator, None)
            self.window.wait += time.time() - t0
            local = self.label_counts(batch)
            counts = self.all_reduce(local.clone()) if self.world > 1 else local
            if batch is None or int(counts[-1]) < self.world:
                exhausted = True
                break
            self.train_step(batch, local, counts)
            if self.attempts[-1]["startup_s"] is None:
                self.attempts[-1]["startup_s"] = round(time.time() - self.t_start, 3)
            final = self.step >= self.total_steps
            every = (self.tcfg.report_every_steps, self.tcfg.checkpoint.every_steps)
            if final or any(self.step % n == 0 for n in every):
                self.report(final)
            for hook in self.hooks:
                hook(self)
        if exhausted and self.step_in_epoch == 0:
            raise RuntimeError(f"the training shard yielded no full batch of {self.per_worker} rows in "
                               f"epoch {self.epoch}")
        if exhausted or self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def label_counts(self, batch: Optional[dict]) -> torch.Tensor:
        """Labelled rows per task in this rank's batch, then 1 (this rank has data); zeros for
        no batch. Counted on the host: the masks are still CPU tensors here."""
        if batch is None:
            return torch.zeros(len(self.task_names) + 1, dtype=torch.float32)
        return torch.tensor([float(batch[f"{t}/mask"].sum()) for t in self.task_names] + [1.0])

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over the ranks (a CPU tensor)."""
        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def autocast(self):
        """The forward's precision context: ``precision`` resolved on this worker's device (bf16
        autocast needs no GradScaler)."""
        return autocast(resolve_precision(self.tcfg.precision, self.device), self.device)

    def train_step(self, batch: dict, local: Optional[torch.Tensor] = None,
                   counts: Optional[torch.Tensor] = None) -> None:
        """One optimiser step on a collated batch (:func:`must_ray.train.step.train_step`), added to
        the report window. ``local`` / ``counts``: this rank's and the global :meth:`label_counts`
        (default: this batch's, i.e. one worker)."""
        local = self.label_counts(batch) if local is None else local
        counts = local if counts is None else counts
        n = len(self.task_names)
        images_u8, targets = split_batch(batch_to_device(batch, self.device))
        present = {t: bool(counts[i] > 0) for i, t in enumerate(self.task_names)}
        total, losses = train_step(self.module, self.wrapped, self.tasks, images_u8, targets, present, self.optimizer,
                                   self.scheduler, grad_clip=self.tcfg.optimizer.grad_clip, ema=self.ema,
                                   step=self.step, channels_last=self.tcfg.channels_last, autocast=self.autocast)
        self.step += 1
        self.step_in_epoch += 1
        self.window.add(total, [losses[t] for t in self.task_names], (local[:n] > 0).double())

    # ------------------------------------------------------------------------- report / checkpoint / export

    def report(self, final: bool) -> None:
        """Every rank: the window's metrics (all-reduced) into the history, the log line and the
        dashboard, then ``ray.train.report``; rank 0 attaches a checkpoint every
        ``checkpoint.every_steps`` steps and at the end."""
        import ray.train

        self.final_reported = self.final_reported or final
        metrics = self.window_metrics()
        if self.window.steps or not self.history or self.history[-1]["step"] != self.step:
            self.history.append(metrics)
        if self.rank == 0 and self.window.steps:
            parts = " ".join(f"{t}={metrics[f'loss_{t}']:.4f}" for t in self.task_names
                             if metrics[f"loss_{t}"] is not None)
            say(f"[{self.run.run_name}] step {self.step}/{self.total_steps} epoch {self.epoch} "
                f"loss {metrics['loss']:.4f} ({parts}) lr {metrics['lr']:.2e} {metrics['images_per_s']:.1f} img/s "
                f"x{self.world}")
        if self.dashboard is not None:
            self.dashboard.report(metrics, self.task_names, steps=self.window.steps)
        self.window.reset()
        if self.rank == 0 and (final or self.step % self.tcfg.checkpoint.every_steps == 0):
            self.checkpoint(metrics, final)
        else:
            ray.train.report(metrics, checkpoint=None)

    def window_metrics(self) -> dict[str, Any]:
        """The metrics of the steps since the last report, over all ranks (one all-reduce)."""
        n = len(self.task_names)
        stats = self.window.stats()
        if self.world > 1:
            stats = self.all_reduce(stats)
        losses, counts = stats[:n], stats[n:2 * n]
        steps = self.window.steps
        elapsed = max(time.time() - self.window.t, 1e-9)
        metrics: dict[str, Any] = {
            "step": self.step, "epoch": self.epoch, "total_steps": self.total_steps, "world_size": self.world,
            "global_batch": self.batch_size, "lr": self.optimizer.param_groups[0]["lr"],
            "loss": float(stats[2 * n]) / max(steps * self.world, 1),
            "images_per_s": steps * self.batch_size / elapsed,
            "data_wait_frac": float(stats[2 * n + 1]) / self.world / elapsed,
            "time": time.time(),
        }
        for i, t in enumerate(self.task_names):
            metrics[f"loss_{t}"] = float(losses[i] / counts[i]) if counts[i] > 0 else None
        if self.tcfg.loss.weighting == "uncertainty":
            metrics.update({f"weight_{t}": w for t, w in self.module.weighting.effective().items()})
        return metrics

    def checkpoint(self, metrics: dict[str, Any], final: bool) -> None:
        """Rank 0: report ``metrics`` with a checkpoint of the run (the final one also holds the
        exported model)."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="must_ray_ckpt_") as tmp:
            state = self.state_dict()
            meta = {k: state[k] for k in ("format", "role", "tasks", "classes", "step", "epoch", "step_in_epoch",
                                          "attempts")}
            meta.update(backbone=self.tcfg.model.backbone, final=final, total_steps=self.total_steps,
                        run_name=self.run.run_name, data=list(self.run.data), rows=self.run.num_rows)
            write_checkpoint(tmp, state, meta, self.history)
            if final:
                self.export(os.path.join(tmp, MODEL_FILE))
            name = checkpoint_dir_name(self.step, len(self.attempts) - 1, final)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        if self.dashboard is not None:
            self.dashboard.checkpointed()

    def export(self, path: str) -> None:
        """Write the model file (the EMA weights when EMA is on) to ``path``."""
        target = self.ema.module if self.ema is not None else self.module.model
        save_model(path, target, num_classes=len(self.classes), task_cfgs=self.cfg.tasks, classes=self.classes,
                   image_size=self.run.image_size, fpn_channels=self.tcfg.model.fpn_channels,
                   extra={"role": self.run.role, "run_name": self.run.run_name, "step": self.step,
                          "ema": self.ema is not None, "data": list(self.run.data)})
