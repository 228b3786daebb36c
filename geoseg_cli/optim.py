"""The paper's optimisation: parameter groups, learning-rate schedule, mixed precision, a step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from geoseg_cli.train_config import TrainConfig

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
    warmup_steps: int = 0,
) -> float:
    """Multiplier of the initial LR after ``step`` optimizer steps.

    Polynomial decay ``(1 − step/total)^power`` combined with ``gamma`` every
    ``step_epochs`` epochs, times a linear warm-up ``(step + 1)/warmup_steps`` over the
    first ``warmup_steps`` steps.
    """
    poly = max(0.0, 1.0 - step / total_steps) ** power
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warmup * poly * gamma ** (step // steps_per_epoch // step_epochs)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> LambdaLR:
    """A per-step LambdaLR of :func:`lr_factor`; its state is a step counter, restored exactly."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(
            step,
            steps_per_epoch,
            total,
            config.poly_power,
            config.lr_step_epochs,
            config.lr_step_gamma,
            warmup,
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
    """Training-mode forward pass and total loss, under autocast when ``dtype`` is set.

    The labels go to the network too: heads that sample their graph from them in training
    (``cdgc``) need them; the SCG heads ignore them. The images go to the loss too (the
    ``partial`` loss's colour affinities).
    """
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        return criterion(net(images, labels), labels, images).total


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
