"""Training: the paper's recipe, AMP, DDP under ``torchrun``, exact resume (DESIGN.md §5)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from geoseg_cli.checkpoint import (
    Checkpoint,
    ModelSpec,
    create_model_from_spec,
    load_checkpoint,
    save_checkpoint,
)
from geoseg_cli.chips import load_training_chips
from geoseg_cli.data import ChipDataset, ceil_to_stride
from geoseg_cli.distributed import Torchrun, barrier, process_group, resolve_device, torchrun_env
from geoseg_cli.errors import CheckpointError, GeosegError, InputError, Interrupted, UsageError
from geoseg_cli.metrics import ConfusionMatrix, Metrics
from geoseg_cli.optim import (
    amp_dtype,
    forward_loss,
    make_scheduler,
    optimizer_step,
    parameter_groups,
)
from geoseg_cli.progress import progress
from geoseg_cli.recipe import loss_class_weights, recipe_report
from geoseg_cli.run_state import (
    check_run_dir,
    discard_unfinished,
    kept_note,
    make_run_dir,
    non_finite_message,
    plot_history,
    read_history,
    rng_state,
    seed_everything,
    set_rng_state,
    write_history,
)
from geoseg_cli.sampling import chip_index, train_sampler
from geoseg_cli.train_config import TrainConfig, write_config_file

log = logging.getLogger(__name__)

#: Debug aid: when set to a folder, every rank saves its final weights there (rank<N>.pt).
DUMP_ENV = "GEOSEG_DEBUG_RANK_WEIGHTS"


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: The run folder.
        best_path: ``best.pt``.
        last_path: ``last.pt``.
        epochs: Epochs completed (including those before a resume).
        step: Optimizer steps completed.
        best_metric: Name of the selection score.
        best_value: Its best value.
        best_epoch: The epoch (1-based) that reached it.
        history: One dict per epoch, the rows of ``metrics.csv``.
    """

    run_dir: Path
    best_path: Path
    last_path: Path
    epochs: int
    step: int
    best_metric: str
    best_value: float
    best_epoch: int
    history: list[dict[str, float]]


class _NonFiniteLoss(Exception):
    def __init__(self, value: float, chips: list[str]) -> None:
        super().__init__(value)
        self.value = value
        self.chips = chips  # chips of the batch whose input is not finite


class _Trainer:
    """One training run on one process (one rank under torchrun)."""

    def __init__(self, config: TrainConfig, ctx: Torchrun, device: torch.device) -> None:
        from models import SegmentationLoss

        self.config = config
        self.ctx = ctx
        self.device = device
        self.run_dir = config.output
        self.stats, train_records, val_records = load_training_chips(config.chips_dir, config.loss)
        if config.window > max(max(r.width, r.height) for r in train_records) and ctx.is_main:
            log.warning("window %d is larger than the chips: they are padded", config.window)
        self.class_names = [c.name for c in self.stats.classes]
        unknown = [n for n in config.exclude_from_mean if n not in self.class_names]
        if unknown:
            raise UsageError(f"exclude_from_mean {unknown}: no such class in {self.class_names}")
        self.excluded = [self.class_names.index(n) for n in config.exclude_from_mean]
        self.spec = ModelSpec(
            variant=config.variant,
            backbone=config.backbone,
            num_classes=len(self.class_names),
            in_channels=len(self.stats.input.bands),
            options=dict(config.model_options),
        )

        self.train_set = ChipDataset.for_training(config, train_records, self.stats)
        self.num_val = len(val_records)
        val_size = ceil_to_stride(max(max(r.width, r.height) for r in val_records))
        val_set = ChipDataset(config.chips_dir, ctx.shard(val_records), self.stats, val_size)
        self.sampler = train_sampler(config, train_records, ctx)
        loader_args = {
            "batch_size": config.batch_size,
            "num_workers": config.workers,
            "pin_memory": device.type == "cuda",
        }
        self.train_loader = DataLoader(self.train_set, sampler=self.sampler, **loader_args)
        self.val_loader = DataLoader(val_set, shuffle=False, **loader_args)
        self.steps_per_epoch = len(self.train_loader)

        seed_everything(config.seed)  # identical initial weights on every rank
        try:
            model = create_model_from_spec(self.spec)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if config.backbone_weights is not None:
            from models import WeightsError, load_backbone_weights

            try:
                load_backbone_weights(model, config.backbone_weights)
            except WeightsError as exc:
                raise InputError(str(exc)) from exc
        self.model = model.to(device)
        self.channels_last = device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = amp_dtype(device, config.amp)
        self.optimizer = torch.optim.Adam(
            parameter_groups(self.model, config.lr, config.weight_decay, config.bias_lr_factor),
            lr=config.lr,
            amsgrad=True,
        )
        self.scheduler = make_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and device.type == "cuda"
        )
        self.criterion = SegmentationLoss(
            config.loss,
            class_weights=loss_class_weights(config, self.stats.class_weights),
            ignore_index=self.stats.ignore_index,
        ).to(device)
        self.epoch = 0
        self.step = 0
        self.best_value: float | None = None
        self.history: list[dict[str, float]] = []
        self.net: nn.Module = self.model
        self.config_saved = False

    def restore(self) -> None:
        """Load ``last.pt`` of the run folder (model, optimizer, scheduler, scaler, RNG)."""
        path = self.run_dir / "last.pt"
        ckpt = load_checkpoint(path)
        training = ckpt.training or {}
        needed = ("optimizer", "scheduler", "rng", "epoch", "step")
        missing = [k for k in needed if k not in training]
        if missing:
            raise CheckpointError(f"{path}: no training state ({missing}); cannot resume from it")
        if dataclasses.astuple(ckpt.model) != dataclasses.astuple(self.spec):
            raise CheckpointError(
                f"{path} holds {ckpt.model.variant}/{ckpt.model.backbone} with "
                f"{ckpt.model.num_classes} classes and {ckpt.model.in_channels} bands, but the "
                f"run now asks for {self.spec.variant}/{self.spec.backbone} with "
                f"{self.spec.num_classes} classes and {self.spec.in_channels} bands"
            )
        self.model.load_state_dict(ckpt.state_dict)
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        if training.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(training["scaler"])
        self.epoch, self.step = int(training["epoch"]), int(training["step"])
        if self.epoch >= self.config.epochs:
            raise UsageError(
                f"{path} has already trained {self.epoch} of {self.config.epochs} epochs; "
                f"pass --epochs N with N > {self.epoch} to train on"
            )
        best = training.get("best_metric")
        self.best_value = None if best is None else float(best)
        ranks = training["rng"].get("ranks", [])
        if len(ranks) == self.ctx.world_size:
            set_rng_state(ranks[self.ctx.rank], self.device)
        else:
            if self.ctx.is_main:
                log.warning(
                    f"{path} was written by {len(ranks)} process(es), this run has "
                    f"{self.ctx.world_size}: random streams are re-seeded, so the run is not "
                    "bit-identical to an uninterrupted one"
                )
            seed_everything(self.config.seed + 1000 * self.epoch + self.ctx.rank)
        if self.steps_per_epoch * self.epoch != self.step and self.ctx.is_main:
            log.warning("steps per epoch changed since the run started; the LR schedule shifts")
        self.history = [row for row in read_history(self.run_dir) if row["epoch"] <= self.epoch]
        self._log(
            f"resuming {path} at epoch {self.epoch + 1}/{self.config.epochs} (step {self.step})"
        )

    def _checkpoint(self, training: dict[str, Any]) -> Checkpoint:
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        return Checkpoint(
            model=self.spec,
            classes=self.stats.classes,
            ignore_index=self.stats.ignore_index,
            input=self.stats.input,
            window=self.config.window,
            state_dict=state,
            training=training,
        )

    def _gather_rng(self) -> list[dict[str, Any]]:
        state = rng_state(self.device)
        if not self.ctx.enabled:
            return [state]
        states: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(states, state)
        return states

    def run(self, on_epoch_end: Callable[[dict[str, float]], None] | None) -> TrainResult:
        config = self.config
        if self.ctx.enabled:
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.ctx.local_rank] if self.device.type == "cuda" else None
            )
        processes = f" x{self.ctx.world_size} processes" if self.ctx.enabled else ""
        amp = f", AMP {str(self.amp_dtype).removeprefix('torch.')}" if self.amp_dtype else ""
        self._log(
            f"training {config.variant}/{config.backbone} on {self.device}{processes}{amp}: "
            f"{len(self.train_set)} train / {self.num_val} val chips, window {config.window}, "
            f"batch {config.batch_size}, {self.steps_per_epoch} steps per epoch, loss "
            f"{config.loss}"
        )
        summary, mismatch = recipe_report(config)
        self._log(summary)
        if mismatch and self.ctx.is_main:
            log.warning("%s", mismatch)
        for epoch in range(self.epoch, config.epochs):
            started = time.perf_counter()
            self.sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            try:
                train_loss = self._train_epoch(epoch)
            except _NonFiniteLoss as exc:
                message = non_finite_message(self.run_dir, epoch, self.step, exc.value, exc.chips)
                raise GeosegError(message) from None
            metrics, val_loss = self._validate(epoch)
            seconds = time.perf_counter() - started
            record = self._record(epoch, train_loss, val_loss, metrics, seconds)
            self.history.append(record)
            rng = self._gather_rng()
            self.epoch = epoch + 1
            if self.ctx.is_main:
                self._save(record, rng)
            barrier(self.ctx)
            if on_epoch_end is not None:
                on_epoch_end(record)
        self._dump_rank_weights()
        return self._result()

    def _train_epoch(self, epoch: int) -> float:
        self.net.train()
        total, batches = 0.0, 0
        bar = self._bar(self.train_loader, f"epoch {epoch + 1}/{self.config.epochs}")
        for batch, (images, labels) in enumerate(bar):
            images, labels = self._to_device(images, labels)
            loss = forward_loss(self.net, self.criterion, images, labels, self.amp_dtype)
            value = self._all_ranks_finite(loss.detach())
            if not math.isfinite(value):
                raise _NonFiniteLoss(value, self._non_finite_chips(batch, images))
            optimizer_step(loss, self.optimizer, self.scaler, self.scheduler)
            self.step += 1
            total += value
            batches += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        mean = torch.tensor([total, batches], dtype=torch.float64, device=self.device)
        if self.ctx.enabled:
            dist.all_reduce(mean)
        return float(mean[0] / mean[1])

    def _non_finite_chips(self, batch: int, images: torch.Tensor) -> list[str]:
        """Chip ids of the images of this rank's batch ``batch`` that are not all finite."""
        bad = (~torch.isfinite(images)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        if not bad:
            return []
        order = list(self.sampler)  # this epoch's chip order on this rank
        first = batch * self.config.batch_size
        return [self.train_set.records[chip_index(order[first + i])].chip_id for i in bad]

    def _all_ranks_finite(self, loss: torch.Tensor) -> float:
        """This rank's loss value; NaN on every rank if any rank's loss is not finite."""
        value = float(loss)
        if self.ctx.enabled:
            bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=self.device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item() and math.isfinite(value):
                return float("nan")
        return value

    @torch.no_grad()
    def _validate(self, epoch: int) -> tuple[Metrics, float]:
        if self.ctx.enabled:  # running BN statistics differ per rank after the last step
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        self.model.eval()
        matrix = ConfusionMatrix(self.spec.num_classes, self.stats.ignore_index)
        loss_sum, pixels = 0.0, 0
        for images, labels in self._bar(self.val_loader, f"validate {epoch + 1}"):
            images, labels = self._to_device(images, labels)
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                logits = self.model(images).float()
            loss_sum += float(self.criterion(logits, labels, images).total) * len(labels)
            pixels += len(labels)
            matrix.update(logits.argmax(1), labels)
        totals = torch.tensor([loss_sum, pixels], dtype=torch.float64, device=self.device)
        counts = torch.from_numpy(matrix.counts).to(self.device)
        if self.ctx.enabled:
            dist.all_reduce(totals)
            dist.all_reduce(counts)
            matrix.counts = counts.cpu().numpy()
        metrics = matrix.metrics(self.class_names, self.excluded)
        return metrics, float(totals[0] / max(float(totals[1]), 1.0))

    def _to_device(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _bar(self, iterable: Iterable, desc: str) -> Iterable:
        if not self.ctx.is_main:
            return iterable
        return progress(iterable, desc=desc, unit="batch")

    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            log.info(message)

    def _record(
        self, epoch: int, train_loss: float, val_loss: float, metrics: Metrics, seconds: float
    ) -> dict[str, float]:
        record: dict[str, float] = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": train_loss,
            "val_loss": val_loss,
        }
        return {**record, **metrics.scores(), "seconds": seconds}

    def _save(self, record: dict[str, float], rng: list[dict[str, Any]]) -> None:
        """Rank 0: metrics.csv, best.pt (if improved), last.pt, curves.png."""
        value = record[self.config.best_metric]
        if not math.isfinite(value):
            log.warning(
                "validation %s is %s: do the val chips have labelled pixels?",
                self.config.best_metric,
                value,
            )
        improved = math.isfinite(value) and (self.best_value is None or value > self.best_value)
        if improved:
            self.best_value = value
        scores = {"epoch": self.epoch, "step": self.step, "best_metric": self.best_value}
        if not self.config_saved:  # with the first checkpoint: a run folder always has both
            write_config_file(self.config, self.run_dir / "config.toml")
            self.config_saved = True
        write_history(self.run_dir / "metrics.csv", self.history)
        if improved:
            save_checkpoint(self._checkpoint(scores), self.run_dir / "best.pt")
        training = {
            **scores,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"ranks": rng},
        }
        save_checkpoint(self._checkpoint(training), self.run_dir / "last.pt")
        plot_history(self.run_dir / "curves.png", self.history)
        best = self.best_value if self.best_value is not None else float("nan")
        log.info(
            f"epoch {self.epoch}/{self.config.epochs}: train loss {record['train_loss']:.4f}, "
            f"val loss {record['val_loss']:.4f}, OA {record['oa']:.4f}, "
            f"mF1 {record['mf1']:.4f}, mIoU {record['miou']:.4f} "
            f"(best {self.config.best_metric} {best:.4f}){' *' if improved else ''} "
            f"[{record['seconds']:.1f} s]"
        )

    def _dump_rank_weights(self) -> None:
        folder = os.environ.get(DUMP_ENV)
        if folder:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            torch.save(state, Path(folder) / f"rank{self.ctx.rank}.pt")

    def _result(self) -> TrainResult:
        metric = self.config.best_metric
        best_epoch = next(
            (int(r["epoch"]) for r in self.history if r[metric] == self.best_value), 0
        )
        return TrainResult(
            run_dir=self.run_dir,
            best_path=self.run_dir / "best.pt",
            last_path=self.run_dir / "last.pt",
            epochs=self.epoch,
            step=self.step,
            best_metric=metric,
            best_value=float("nan") if self.best_value is None else self.best_value,
            best_epoch=best_epoch,
            history=self.history,
        )


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a model on a chips folder; resumable, distributed under ``torchrun``.

    Reads a ``geoseg tile`` folder; from the first epoch on, writes ``config.toml``,
    ``metrics.csv``, ``best.pt``, ``last.pt`` and ``curves.png`` into the run folder (a run
    stopped before its first epoch leaves nothing). ``resume`` restores the model, optimizer,
    scheduler, gradient scaler and every rank's RNG states from ``last.pt``; chip order and
    augmentations are seeded by (seed, epoch[, chip]), so epoch N+1 after a resume is the
    epoch N+1 of an uninterrupted run. Under ``torchrun`` the model is wrapped in
    DistributedDataParallel (NCCL on CUDA, gloo on CPU), chips are sharded, ``batch_size``
    is per process, and only rank 0 logs and writes.

    Args:
        config: The run (see :class:`TrainConfig`); ``config.output`` is the run folder.
        resume: Continue the run in ``config.output`` from its ``last.pt`` (build the config
            with :func:`resume_config`).
        on_epoch_end: Called on every rank after each epoch (after the checkpoints are
            written) with that epoch's row of ``metrics.csv``.

    Returns:
        Paths, best score and per-epoch history.

    Raises:
        GeosegError: Bad chips folder, existing run, unusable checkpoint, or a loss that
            became NaN/inf (``last.pt`` of the previous epoch is kept).
        Interrupted: Ctrl-C or SIGTERM; the message says what was kept.
    """
    config.validate()
    ctx = torchrun_env()
    device = resolve_device(config.device, ctx)
    with process_group(ctx, device.type):
        config = dataclasses.replace(
            config,
            output=Path(config.output).absolute(),
            chips_dir=Path(config.chips_dir).absolute(),
        )
        trainer = _Trainer(config, ctx, device)
        check_run_dir(config.output, resume, config.overwrite)
        barrier(ctx)  # every rank has checked before rank 0 changes anything
        created = ctx.is_main and make_run_dir(config.output, resume)
        try:
            if resume:
                trainer.restore()
            else:
                seed_everything(config.seed + ctx.rank)
            return trainer.run(on_epoch_end)
        except BaseException as exc:
            if created:
                discard_unfinished(config.output)
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
                raise Interrupted(kept_note(config.output, trainer.epoch)) from exc
            raise
