"""Training: the paper's recipe, AMP, DDP under ``torchrun``, exact resume (DESIGN.md §5).

``train(TrainConfig(chips_dir, output))`` reads a ``geoseg tile`` folder and writes into the
run folder: ``config.toml`` (the resolved configuration), ``metrics.csv`` (one row per
epoch), ``best.pt`` (best validation score), ``last.pt`` (full training state for
``--resume``) and ``curves.png`` (when matplotlib is installed).

Exactness of ``--resume``: the model, optimizer, LR scheduler, gradient scaler, and every
rank's torch/numpy/python (and CUDA) RNG states are restored from ``last.pt``; the chip
order comes from a sampler seeded by (seed, epoch) and augmentations from generators
seeded by (seed, epoch, chip), so epoch N+1 after a resume is the epoch N+1 of an
uninterrupted run.

Distributed: when started by ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU), training chips are sharded by a
DistributedSampler and ``--batch-size`` is per process. Validation is sharded too and its
confusion matrices summed, so every rank knows the scores; only rank 0 logs and writes.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler

from geoseg_cli.checkpoint import (
    Checkpoint,
    ModelSpec,
    create_model_from_spec,
    load_checkpoint,
    save_checkpoint,
)
from geoseg_cli.chips import ChipStats, load_stats, read_manifest
from geoseg_cli.data import ChipDataset, ceil_to_stride
from geoseg_cli.distributed import Torchrun, resolve_device, torchrun_env
from geoseg_cli.errors import CheckpointError, GeosegError, InputError, OutputError, UsageError
from geoseg_cli.metrics import ConfusionMatrix, Metrics
from geoseg_cli.progress import progress
from geoseg_cli.raster import atomic_output
from geoseg_cli.train_config import (
    BEST_METRICS,
    DEFAULT_LR,
    TrainConfig,
    read_config_file,
    resume_config,
    write_config_file,
)

log = logging.getLogger(__name__)

#: Files of a run folder.
RUN_FILES = ("config.toml", "metrics.csv", "best.pt", "last.pt", "curves.png")
#: Debug aid: when set to a folder, every rank saves its final weights there (rank<N>.pt).
DUMP_ENV = "GEOSEG_DEBUG_RANK_WEIGHTS"


# --- results ---------------------------------------------------------------------------------


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


# --- distributed context --------------------------------------------------------------------


@dataclass(frozen=True)
class _Dist(Torchrun):
    """The torchrun environment, and whether this run created the process group."""

    owns_group: bool = False

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()


def _start_distributed(env: Torchrun, device_kind: str) -> _Dist:
    """Join the torchrun process group when several processes run."""
    if not env.enabled:
        return _Dist()
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(
            "nccl" if device_kind == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60)
        )
    return _Dist(env.rank, env.world_size, env.local_rank, owns_group)


# --- RNG state as plain containers (loadable with weights_only=True) -------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- optimisation ----------------------------------------------------------------------------

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, bias_lr_factor: float
) -> list[dict[str, Any]]:
    """The paper's optimizer groups.

    Weights: ``lr`` with weight decay; norm parameters and other 0/1-d tensors: ``lr``
    without decay; biases (outside norm layers): ``lr × bias_lr_factor`` without decay.
    """
    norm_params = {
        id(p)
        for module in model.modules()
        if isinstance(module, _NORM_TYPES)
        for p in module.parameters(recurse=False)
    }
    decay, no_decay, biases = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in norm_params:
            no_decay.append(param)
        elif name.endswith("bias"):
            biases.append(param)
        elif param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": biases, "lr": lr * bias_lr_factor, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(
    step: int,
    steps_per_epoch: int,
    total_steps: int,
    power: float = 0.9,
    step_epochs: int = 15,
    gamma: float = 0.85,
) -> float:
    """Multiplier of the initial LR after ``step`` optimizer steps.

    Polynomial decay ``(1 − step/total)^power`` combined with ``gamma`` every
    ``step_epochs`` epochs.
    """
    poly = max(0.0, 1.0 - step / total_steps) ** power
    return poly * gamma ** (step // steps_per_epoch // step_epochs)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> LambdaLR:
    """A per-step LambdaLR of :func:`lr_factor` (its state is a step counter, so resuming
    restores it exactly)."""
    total = config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        return lr_factor(
            step,
            steps_per_epoch,
            total,
            config.poly_power,
            config.lr_step_epochs,
            config.lr_step_gamma,
        )

    return LambdaLR(optimizer, factor)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, else fp16 on CUDA; None (fp32) otherwise."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def forward_loss(
    net: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """Training-mode forward pass and total loss, under autocast when ``dtype`` is set."""
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        return criterion(net(images), labels).total


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: LambdaLR,
) -> None:
    """Back-propagate ``loss`` (scaled for fp16), step the optimizer, then the LR schedule."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


# --- the trainer -----------------------------------------------------------------------------


class _NonFiniteLoss(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


class _Trainer:
    """One training run on one process (one rank under torchrun)."""

    def __init__(self, config: TrainConfig, ctx: _Dist, device: torch.device) -> None:
        from models import SegmentationLoss

        self.config = config
        self.ctx = ctx
        self.device = device
        self.run_dir = config.output
        self.stats: ChipStats = load_stats(config.chips_dir)
        records = read_manifest(config.chips_dir)
        train_records = [r for r in records if r.split == "train"]
        val_records = [r for r in records if r.split == "val"]
        if not train_records or not val_records:
            raise InputError(
                f"{config.chips_dir}/manifest.csv: {len(train_records)} train and "
                f"{len(val_records)} val chips; training needs both (re-tile with a val split)"
            )
        if len(self.stats.classes) < 2:
            raise InputError(
                f"{config.chips_dir}/stats.json: one class ({self.stats.classes[0].name}); "
                "segmentation needs at least two. Re-tile with a classes file that maps every "
                "label value (e.g. value = 255 for a 0/255 mask), or another --ignore-index"
            )
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
        )

        self.train_set = ChipDataset(
            config.chips_dir,
            train_records,
            self.stats,
            config.window,
            random_crop=True,
            flips=config.flips,
            rot90=config.rot90,
            seed=config.seed,
        )
        self.num_val = len(val_records)
        val_size = ceil_to_stride(max(max(r.width, r.height) for r in val_records))
        val_set = ChipDataset(config.chips_dir, ctx.shard(val_records), self.stats, val_size)
        self.sampler = DistributedSampler(
            self.train_set, ctx.world_size, ctx.rank, shuffle=True, seed=config.seed
        )
        loader_args = {
            "batch_size": config.batch_size,
            "num_workers": config.workers,
            "pin_memory": device.type == "cuda",
        }
        self.train_loader = DataLoader(self.train_set, sampler=self.sampler, **loader_args)
        self.val_loader = DataLoader(val_set, shuffle=False, **loader_args)
        self.steps_per_epoch = len(self.train_loader)

        _seed_everything(config.seed)  # identical initial weights on every rank
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
        weights = self.stats.class_weights if config.loss != "dice" else None
        self.criterion = SegmentationLoss(
            config.loss, class_weights=weights, ignore_index=self.stats.ignore_index
        ).to(device)
        self.epoch = 0
        self.step = 0
        self.best_value: float | None = None
        self.history: list[dict[str, float]] = []
        self.net: nn.Module = self.model

    # -- state --------------------------------------------------------------------------------

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
            _set_rng_state(ranks[self.ctx.rank], self.device)
        else:
            if self.ctx.is_main:
                log.warning(
                    "%s was written by %d process(es), this run has %d: random streams are "
                    "re-seeded, so the run is not bit-identical to an uninterrupted one",
                    path,
                    len(ranks),
                    self.ctx.world_size,
                )
            _seed_everything(self.config.seed + 1000 * self.epoch + self.ctx.rank)
        if self.steps_per_epoch * self.epoch != self.step and self.ctx.is_main:
            log.warning("steps per epoch changed since the run started; the LR schedule shifts")
        self.history = [row for row in _read_history(self.run_dir) if row["epoch"] <= self.epoch]
        self._log(
            "resuming %s at epoch %d/%d (step %d)",
            path,
            self.epoch + 1,
            self.config.epochs,
            self.step,
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
        state = _rng_state(self.device)
        if not self.ctx.enabled:
            return [state]
        states: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(states, state)
        return states

    # -- loop ---------------------------------------------------------------------------------

    def run(self, on_epoch_end: Callable[[dict[str, float]], None] | None) -> TrainResult:
        config = self.config
        if self.ctx.enabled:
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.ctx.local_rank] if self.device.type == "cuda" else None
            )
        self._log(
            "training %s/%s on %s%s%s: %d train / %d val chips, window %d, batch %d, "
            "%d steps per epoch, loss %s",
            config.variant,
            config.backbone,
            self.device,
            f" x{self.ctx.world_size} processes" if self.ctx.enabled else "",
            f", AMP {str(self.amp_dtype).removeprefix('torch.')}" if self.amp_dtype else "",
            len(self.train_set),
            self.num_val,
            config.window,
            config.batch_size,
            self.steps_per_epoch,
            config.loss,
        )
        for epoch in range(self.epoch, config.epochs):
            started = time.perf_counter()
            self.sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            try:
                train_loss = self._train_epoch(epoch)
            except _NonFiniteLoss as exc:
                raise self._non_finite_error(epoch, exc.value) from None
            metrics, val_loss = self._validate(epoch)
            seconds = time.perf_counter() - started
            record = self._record(epoch, train_loss, val_loss, metrics, seconds)
            self.history.append(record)
            rng = self._gather_rng()
            self.epoch = epoch + 1
            if self.ctx.is_main:
                self._save(record, rng)
            self.ctx.barrier()
            if on_epoch_end is not None:
                on_epoch_end(record)
        self._dump_rank_weights()
        return self._result()

    def _train_epoch(self, epoch: int) -> float:
        self.net.train()
        total, batches = 0.0, 0
        bar = self._bar(self.train_loader, f"epoch {epoch + 1}/{self.config.epochs}")
        for images, labels in bar:
            images, labels = self._to_device(images, labels)
            loss = forward_loss(self.net, self.criterion, images, labels, self.amp_dtype)
            value = self._all_ranks_finite(loss.detach())
            if not math.isfinite(value):
                raise _NonFiniteLoss(value)
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
                logits = self.model(images)
            loss_sum += float(self.criterion(logits.float(), labels).total) * len(labels)
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

    def _log(self, message: str, *args: Any) -> None:
        if self.ctx.is_main:
            log.info(message, *args)

    def _record(
        self, epoch: int, train_loss: float, val_loss: float, metrics: Metrics, seconds: float
    ) -> dict[str, float]:
        record: dict[str, float] = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": train_loss,
            "val_loss": val_loss,
            "oa": metrics.oa,
            "mf1": metrics.mf1,
            "miou": metrics.miou,
        }
        for name, f1, iou in zip(self.class_names, metrics.f1, metrics.iou, strict=True):
            record[f"f1_{name}"] = float(f1)
            record[f"iou_{name}"] = float(iou)
        record["seconds"] = seconds
        return record

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
        _write_history(self.run_dir / "metrics.csv", self.history)
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
        _plot_history(self.run_dir / "curves.png", self.history)
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, OA %.4f, mF1 %.4f, mIoU %.4f "
            "(best %s %.4f)%s [%.1f s]",
            self.epoch,
            self.config.epochs,
            record["train_loss"],
            record["val_loss"],
            record["oa"],
            record["mf1"],
            record["miou"],
            self.config.best_metric,
            self.best_value if self.best_value is not None else float("nan"),
            " *" if improved else "",
            record["seconds"],
        )

    def _non_finite_error(self, epoch: int, value: float) -> GeosegError:
        last = self.run_dir / "last.pt"
        kept = (
            f"{last} (epoch {epoch}) is kept; continue from it with --resume {self.run_dir}"
            if last.is_file()
            else "no checkpoint had been written yet"
        )
        return GeosegError(
            f"training stopped: the loss became {value} at epoch {epoch + 1}, step "
            f"{self.step + 1}; {kept} after lowering the LR (--lr), or try --loss ce or --no-amp"
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


# --- run folder files ------------------------------------------------------------------------


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        for row in history:
            writer.writerow({k: v if isinstance(v, int) else repr(v) for k, v in row.items()})


def _read_history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: int(v) if k in ("epoch", "step") else float(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def _plot_history(path: Path, history: list[dict[str, float]]) -> None:
    """Loss and score curves; a log note when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    except ImportError:
        if len(history) == 1:
            log.info("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    losses, scores = fig.subplots(1, 2)
    curves = {"train_loss": "train (with L_kl, L_dl)", "val_loss": "val (segmentation)"}
    for key, label in curves.items():
        losses.plot(epochs, [row[key] for row in history], marker="o", label=label)
    for key in ("oa", "mf1", "miou"):
        scores.plot(epochs, [row[key] for row in history], marker="o", label=key)
    losses.set(xlabel="epoch", ylabel="loss", title="loss")
    scores.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1))
    for ax in (losses, scores):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=100)


def _prepare_run_dir(config: TrainConfig, resume: bool, ctx: _Dist) -> None:
    run_dir = config.output
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise CheckpointError(f"{run_dir}: no last.pt to resume from; start a new run")
    else:
        existing = [name for name in RUN_FILES if (run_dir / name).exists()]
        if existing and not config.overwrite:
            raise OutputError(
                f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume "
                f"{run_dir} to continue it or --overwrite to start over"
            )
    ctx.barrier()  # every rank has checked before rank 0 changes anything
    if not ctx.is_main:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"{run_dir} is a file; give a folder for the run")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a model on a chips folder; resumable, distributed under ``torchrun``.

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
    """
    config.validate()
    env = torchrun_env()
    device = resolve_device(config.device, env)
    ctx = _start_distributed(env, device.type)
    try:
        config = dataclasses.replace(
            config,
            output=Path(config.output).absolute(),
            chips_dir=Path(config.chips_dir).absolute(),
        )
        trainer = _Trainer(config, ctx, device)
        _prepare_run_dir(config, resume, ctx)
        if resume:
            trainer.restore()
        else:
            _seed_everything(config.seed + ctx.rank)
        if ctx.is_main:  # only once the run is known good: a refused resume changes nothing
            write_config_file(config, config.output / "config.toml")
        return trainer.run(on_epoch_end)
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


__all__ = [
    "BEST_METRICS",
    "DEFAULT_LR",
    "TrainConfig",
    "TrainResult",
    "amp_dtype",
    "forward_loss",
    "lr_factor",
    "make_scheduler",
    "optimizer_step",
    "parameter_groups",
    "read_config_file",
    "resume_config",
    "train",
    "write_config_file",
]
