"""The one training function: data -> model -> optimizer -> epochs -> report + checkpoint.

:func:`run_trial` trains one :class:`~trainables.config.TrialConfig` and reports through a
:class:`~trainables.sessions.Session`: a plain list (tests, scripts), a Ray Tune function
trial (one worker, no worker group), or a Ray Train worker (DDP, ``num_workers > 1``).
Precision (``fp32 | amp_bf16 | amp_fp16``) is a switch inside it, not another loop.

Every epoch reports ``train_loss, train_acc, test_loss, test_acc`` (``val_*`` with a
validation split), ``lr``, ``skipped_steps`` (steps the optimizer skipped for an inf/NaN
gradient), ``epoch_seconds``, ``train_seconds``, ``images_per_s`` and
writes a checkpoint (model, optimizer, scheduler, scaler, stage states, config, epoch,
history, RNG). A run resumed from a checkpoint ends with the same numbers as an
uninterrupted one: every epoch seeds its own shuffle, crops and dropout from
``(seed, epoch, rank)``.

Compression plugs in as trial stages (:mod:`trainables.stages`), built from the config
and run in their order as one pipeline: ``plan`` (the number of steps) and ``prepare``
before the optimizer exists, a loss ``penalty``, ``before_step`` (between backward and
the optimizer step) and ``after_step``, ``epoch_end`` after each epoch's evaluation, and
``finalize`` after the last epoch, each stage from the earlier ones' result; the final
metrics join the last report and the files travel in the checkpoint's ``artifacts/``
folder.

Example::

    from trainables import TrialConfig, run_trial, LocalSession
    cfg = TrialConfig().with_overrides(["data.root=../shared/data", "train.epochs=1"])
    history = run_trial(cfg, LocalSession())
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

import optim
from trainables.config import OptimConfig, TrainConfig, TrialConfig
from trainables.data import BatchLoader, load_splits
from trainables.initial_weights import load_initial_weights
from trainables.models import model_for_trial
from trainables.sessions import ARTIFACTS_DIR, STATE_FILE, Session
from trainables.stages import Pipeline, Stage, StageContext, TrainingPlan, build_pipeline

__all__ = ["run_trial", "build_schedule", "pick_device", "train_loop_per_worker"]

_AMP_DTYPES = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}
# Divergence: the weights hold inf/NaN, or the loss was non-finite on
# ``train.nonfinite_streak`` batches in a row (every step skipped: training is stuck). One
# overflowing batch (AMP fp16) is not divergence: the optimizers and GradScaler skip that
# step. Checked every DIVERGENCE_CHECK_EVERY batches and at the epoch's end (one host
# sync each): a diverged trial stops within the epoch.
DIVERGENCE_CHECK_EVERY = 25


def pick_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    if cfg.use_gpu and cfg.device in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if cfg.device == "cuda":
            raise RuntimeError("train.device=cuda but no CUDA device is visible to this worker")
    return torch.device("cpu")


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int,
                   steps_per_epoch: int,
                   segment: Callable[[int], tuple[int, int, float] | None] | None = None
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier of the base learning rate.

    - constant: 1.
    - step: ``gamma ** (epoch // step_epochs)``.
    - cosine: linear warm-up over ``warmup_fraction`` of all steps, then cosine to 0.
    - onecycle: linear warm-up from 0.1 to 1, then linear decay to 0 (the fast recipe).

    ``segment(step)`` (the stages' :meth:`~trainables.stages.Stage.lr_segment`) restarts
    the schedule: (first step, length, scale) of the segment holding ``step``, over which
    the schedule runs as over all of training, times ``scale``; None: all of training.
    """
    whole = max(1, epochs * steps_per_epoch)

    def factor(step: int) -> float:
        found = segment(step) if segment is not None else None
        if found is None:
            return base(step, whole)
        first, length, scale = found
        return scale * base(step - first, max(1, length))

    def base(step: int, total: int) -> float:
        warmup = int(cfg.warmup_fraction * total)
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
        if step < warmup:
            start = 0.1 if cfg.schedule == "onecycle" else 0.0
            return start + (1.0 - start) * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class _Counts:
    """Running sums kept on the device: one host sync per epoch, not per batch. The loss
    is averaged over the batches whose loss is finite; ``streak`` counts the batches in a
    row whose loss was not (carried over epochs)."""

    loss: torch.Tensor
    correct: torch.Tensor
    finite_n: torch.Tensor
    streak: torch.Tensor
    worst_streak: torch.Tensor
    finite_only: bool = False  # training: skip non-finite batches; evaluation: keep them
    n: int = 0

    @classmethod
    def zeros(cls, device: torch.device, streak: torch.Tensor | None = None,
              finite_only: bool = False) -> "_Counts":
        z = torch.zeros((), dtype=torch.float64, device=device)
        streak = z.clone() if streak is None else streak
        return cls(z.clone(), z.clone(), z.clone(), streak, streak.clone(), finite_only)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        loss = loss.detach().double()
        finite = torch.isfinite(loss) | (not self.finite_only)
        self.loss += torch.where(finite, loss, 0.0) * len(y)
        self.finite_n += finite * len(y)
        self.streak = (self.streak + 1) * ~torch.isfinite(loss)
        self.worst_streak = torch.maximum(self.worst_streak, self.streak)
        self.correct += (logits.argmax(dim=1) == y).sum()
        self.n += len(y)

    def reduce(self) -> tuple[float, float, int]:
        """(mean loss over finite batches, +inf if none; accuracy; examples), summed
        over all DDP ranks."""
        t = torch.stack([self.loss, self.correct, self.finite_n,
                         torch.tensor(float(self.n), dtype=torch.float64,
                                      device=self.loss.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        loss, correct, finite_n, n = t.tolist()
        mean = loss / finite_n if finite_n else (math.inf if n else 0.0)
        return mean, correct / max(n, 1), int(n)


class _Trainer:
    """The state of one trial on one worker; :func:`run_trial` drives it."""

    def __init__(self, cfg: TrialConfig, session: Session, stages: Pipeline,
                 resuming: bool = False) -> None:
        self.cfg, self.session, self.stages = cfg, session, stages
        self.device = pick_device(cfg.train, session.local_rank)
        threads = cfg.train.threads or max(1, round(cfg.train.cpus_per_worker))
        torch.set_num_threads(threads)
        torch.manual_seed(cfg.train.seed)  # model init is identical on every rank
        self.splits = load_splits(cfg.data, seed=cfg.train.seed)
        model = model_for_trial(cfg, self._data_shape()).to(self.device)
        if cfg.train.channels_last:  # 4-d weights; the inputs follow in the loaders
            model = model.to(memory_format=torch.channels_last)
        # Before the stages (QAT re-parametrizes the weights); not when resuming: the
        # trial's own checkpoint replaces them (and the source may be gone by then).
        if cfg.train.init_from and not resuming:
            load_initial_weights(model, cfg.train.init_from)
        self.train_loader = self._loader("train", cfg.data.batch_size)
        self.eval_loaders = {"test": self._loader("test", cfg.data.test_batch_size)}
        # Scored after each epoch (the stages may score any of eval_loaders at the end).
        self.epoch_splits = [s for s in ("test", "val", "extra")
                             if s != "test" or cfg.evaluate.test_each_epoch]
        if self.splits.val is not None:
            self.eval_loaders["val"] = self._loader("val", cfg.data.test_batch_size)
        if self.splits.extra is not None:
            self.eval_loaders["extra"] = self._loader("extra", cfg.data.test_batch_size)
        # The stages know how long training is before they touch the model (schedules in
        # fractions of training), and prepare it before DDP and the optimizer see it.
        stages.plan(TrainingPlan(cfg.train.epochs, len(self.train_loader),
                                 self._data_shape()))
        model = stages.prepare(model)
        self.model = model
        self.ddp_model: nn.Module = model
        if session.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        o = cfg.optim
        self.optimizer = optim.build_for_model(o.name, model, bias_lr=o.bias_group_lr(),
                                               bias_mode=o.bias_mode, **o.hparams())
        self.scheduler = build_schedule(self.optimizer, o, cfg.train.epochs,
                                        len(self.train_loader), stages.lr_segment)
        mode = cfg.precision.mode
        self.amp_dtype = _AMP_DTYPES.get(mode)
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mode == "amp_fp16")
        self.loss_fn = nn.CrossEntropyLoss()
        self.epoch = 0
        self.step = 0  # optimizer steps so far, over all epochs
        self.diverged_at: tuple[int, int] | None = None  # (epoch, batch) it was seen
        self.streak = torch.zeros((), dtype=torch.float64, device=self.device)
        self.history: list[dict[str, Any]] = []

    def _data_shape(self) -> tuple[int, int, int]:
        return (self.splits.in_channels, self.splits.image_size, self.splits.num_classes)

    def _loader(self, split: str, batch_size: int) -> BatchLoader:
        return self.splits.loader(split, batch_size, self.device, seed=self.cfg.train.seed,
                                  rank=self.session.world_rank,
                                  world_size=self.session.world_size,
                                  channels_last=self.cfg.train.channels_last)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- epochs ---------------------------------------------------------------------------
    def _seed_epoch(self, epoch: int) -> None:
        # Dropout and any other torch randomness of this epoch, independent of history.
        torch.manual_seed((self.cfg.train.seed * 1_000_003 + epoch) * 64 + self.session.world_rank)
        self.train_loader.set_epoch(epoch)

    def train_epoch(self) -> tuple[float, float, int, float]:
        self.ddp_model.train()
        counts = _Counts.zeros(self.device, self.streak, finite_only=True)
        start = time.perf_counter()
        for batch, (x, y) in enumerate(self.train_loader, start=1):
            with self._autocast():
                logits = self.ddp_model(x)
                loss = self.loss_fn(logits, y)
            objective = loss + self._penalty()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(objective).backward()
            self.stages.before_step(self.model, self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            self.stages.after_step(self.step, self.model, self.optimizer)
            counts.add(loss, logits, y)
            if batch % DIVERGENCE_CHECK_EVERY == 0 and self._diverged(counts):
                self.diverged_at = (self.epoch + 1, batch)
                break
        else:
            if self._diverged(counts):
                self.diverged_at = (self.epoch + 1, len(self.train_loader))
        self.streak = counts.streak
        loss, acc, n = counts.reduce()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss, acc, n, time.perf_counter() - start

    def _diverged(self, counts: "_Counts") -> bool:
        """Weights non-finite, or ``train.nonfinite_streak`` non-finite losses in a row, on
        any rank (every rank agrees, so DDP ranks stop together)."""
        stuck = counts.worst_streak >= self.cfg.train.nonfinite_streak
        broken = torch.stack([torch.isfinite(p.detach()).all().logical_not()
                              for p in self.model.parameters()]).any()
        bad = (stuck | broken).to(torch.float32).reshape(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())

    def _penalty(self) -> torch.Tensor | float:
        # Outside autocast: a regularizer summed over all weights wants float32.
        return self.stages.penalty(self.model)

    @torch.no_grad()
    def evaluate(self, loader: BatchLoader, model: nn.Module | None = None
                 ) -> tuple[float, float]:
        # The bare model by default: evaluation needs no gradient sync.
        model = self.model if model is None else model
        model.eval()
        counts = _Counts.zeros(self.device)
        for x, y in loader:
            with self._autocast():
                logits = model(x)
                loss = self.loss_fn(logits.float(), y)
            counts.add(loss, logits, y)
        loss, acc, _ = counts.reduce()
        return loss, acc

    def run_epoch(self) -> dict[str, Any]:
        epoch_start = time.perf_counter()
        self._seed_epoch(self.epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = getattr(self.optimizer, "skipped_steps", 0)
        train_loss, train_acc, n, train_seconds = self.train_epoch()
        metrics: dict[str, Any] = {"epoch": self.epoch + 1, "train_loss": train_loss,
                                   "train_acc": train_acc, "lr": lr}
        # Steps the optimizer skipped for an inf/NaN gradient this epoch (optim.base).
        metrics["skipped_steps"] = getattr(self.optimizer, "skipped_steps", 0) - skipped
        for split in self.epoch_splits:
            if split in self.eval_loaders:
                metrics[f"{split}_loss"], metrics[f"{split}_acc"] = \
                    self.evaluate(self.eval_loaders[split])
        metrics.update(train_seconds=train_seconds, images_per_s=n / max(train_seconds, 1e-9),
                       epoch_seconds=time.perf_counter() - epoch_start)
        if self.diverged_at is not None:
            _mark_diverged(metrics, self.diverged_at, self.step)
        if self.stages:
            with tempfile.TemporaryDirectory(prefix="qsweep-epoch-") as scratch:
                self.stages.epoch_end(self._stage_context(Path(scratch), metrics), metrics)
        self.epoch += 1
        return metrics

    def _stage_context(self, out_dir: Path, epoch_metrics: dict[str, Any] | None = None
                       ) -> StageContext:
        self.model.eval()

        def evaluate(model: nn.Module, split: str = "test") -> dict[str, float]:
            loss, acc = self.evaluate(self.eval_loaders[split], model)
            return {f"{split}_loss": loss, f"{split}_acc": acc}

        def train_batches(n: int) -> Iterator[torch.Tensor]:
            return (x for x, _ in itertools.islice(iter(self.train_loader), n))

        return StageContext(cfg=self.cfg, model=self.model, evaluate=evaluate,
                            splits=tuple(self.eval_loaders), train_batches=train_batches,
                            eval_batches=lambda split: iter(self.eval_loaders[split]),
                            data_shape=self._data_shape(),
                            out_dir=out_dir, is_chief=self.session.world_rank == 0,
                            epoch_metrics=epoch_metrics or {})

    def finalize(self, out_dir: Path) -> dict[str, float]:
        """Every stage's end-of-training work; files go to ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        return self.stages.finalize(self._stage_context(out_dir))

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "stages": self.stages.state_dict(),
            "config": self.cfg.to_flat(),
            "epoch": self.epoch,
            "step": self.step,
            "diverged_at": self.diverged_at,
            "history": self.history,
            "rng": torch.get_rng_state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.stages.load_state_dict(state.get("stages", {}))
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.step = int(state.get("step", self.epoch * len(self.train_loader)))
        at = state.get("diverged_at")
        self.diverged_at = tuple(at) if at is not None else None
        torch.set_rng_state(state["rng"])


def _mark_diverged(metrics: dict[str, Any], at: tuple[int, int], step: int) -> None:
    """The epoch a trial diverged in: flagged, and its non-finite losses reported as +inf,
    the worst value, so a searcher minimizing a loss learns from it (Optuna takes inf; a
    NaN would mark the trial failed); accuracies stay what the weights score (chance)."""
    metrics.update(diverged=1.0, diverged_epoch=at[0], diverged_batch=at[1],
                   diverged_step=step, train_loss=math.inf)
    for key, value in metrics.items():
        if key.endswith("_loss") and isinstance(value, float) and not math.isfinite(value):
            metrics[key] = math.inf


def run_trial(cfg: TrialConfig, session: Session,
              stages: Pipeline | list[Stage] | None = None) -> list[dict[str, Any]]:
    """Train ``cfg`` to ``train.epochs``, reporting each epoch to ``session``.

    ``stages`` default to the ones the config asks for (:func:`build_pipeline`); a list
    runs in its own order. Resumes
    from ``session.load_state()`` when the session holds a checkpoint. Returns the
    per-epoch metrics (the whole history, resumed epochs included; the last one holds
    the stages' final metrics when this call ran the last epoch: a checkpoint saved after
    the last epoch resumes to nothing, and its history lacks them). A trial whose training
    loss turns non-finite stops within that epoch (checked every
    ``DIVERGENCE_CHECK_EVERY`` batches) and reports it as its last epoch (``diverged=1``,
    where, and its losses as +inf); the stages still finalize (their metrics NaN).
    """
    state = session.load_state()
    pipeline = build_pipeline(cfg) if stages is None else \
        stages if isinstance(stages, Pipeline) else Pipeline(stages)
    trainer = _Trainer(cfg, session, pipeline, resuming=state is not None)
    if state is not None:
        trainer.restore(state)
    while trainer.epoch < cfg.train.epochs and trainer.diverged_at is None:
        metrics = trainer.run_epoch()
        metrics["device"] = str(trainer.device)
        trainer.history.append(metrics)
        # A diverged trial stops here: its weights only hold NaN/inf from now on.
        last = trainer.epoch == cfg.train.epochs or trainer.diverged_at is not None
        chief = session.world_rank == 0
        with tempfile.TemporaryDirectory(prefix="qsweep-ckpt-") as directory:
            if cfg.train.checkpoint and chief:
                # Saved before finalize: a stage may transform the model at the end.
                # Through a file object: on a full disk torch's own file writer fails
                # with "unexpected pos", this raises OSError errno 28 (ENOSPC).
                with open(os.path.join(directory, STATE_FILE), "wb") as handle:
                    torch.save(trainer.state(), handle)
            if last and trainer.stages:
                metrics.update(trainer.finalize(Path(directory) / ARTIFACTS_DIR))
            keep = chief and (cfg.train.checkpoint or (last and bool(trainer.stages)))
            session.report(metrics, directory if keep else None)
    return trainer.history


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the config from its flat keys, train under DDP."""
    from trainables.sessions import RayTrainSession, quiet_checkpoint_logs

    quiet_checkpoint_logs()
    run_trial(TrialConfig.from_flat(config), RayTrainSession())
