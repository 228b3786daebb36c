"""The SCG head and the network around every head: backbone → graph head → logits."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from models.backbone import ResNetTrunk
from models.gnn import GNN_LAYERS
from models.scg import SCGBlock, from_nodes, to_nodes

T = TypeVar("T")

#: Hidden features d of the first graph layer.
HIDDEN_FEATURES = 128


@dataclass(frozen=True)
class Variant:
    """One registered model: a head kind and its settings.

    Attributes:
        name: Registry name.
        head: Head kind, a key of :data:`models.registry.HEADS`.
        scg: SCG block kind (``scg``, ``scgae`` or ``scgdir``); None for heads without one.
        gnn1: First (hidden) graph layer (``gcn`` or ``gin``); None without an SCG block.
        gnn2: Second (output) graph layer (``gcn`` or ``gin``); None without an SCG block.
        residual: Whether the SCG residual Ẑ is summed onto the GNN output; None without an
            SCG block.
    """

    name: str
    head: str = "scg"
    scg: str | None = None
    gnn1: str | None = None
    gnn2: str | None = None
    residual: bool | None = None


class AuxiliaryLogits(NamedTuple):
    """Extra class scores a head returns in training, scored with cross-entropy.

    Attributes:
        logits: B×c×H×W class scores (B×c×h×w from the head alone).
        weight: Weight of their cross-entropy in the total loss.
    """

    logits: torch.Tensor
    weight: float


class SegmentationOutput(NamedTuple):
    """Training-mode output of the heads and of :class:`SCGNet`.

    An SCG head fills ``logits``, ``kl_loss`` and ``dl_loss`` (paper eq. 15); other heads
    may leave the SCG terms out and add auxiliary logits, a weight for the main term, or
    OHEM for it (see :class:`models.losses.SegmentationLoss`).

    Attributes:
        logits: B×c×H×W class scores (B×c×h×w from the head alone), what eval returns.
        kl_loss: L_kl, a scalar (zero for SCG kinds without it, e.g. SCGae); None for heads
            without an SCG block.
        dl_loss: L_dl, a scalar; None for heads without an SCG block.
        auxiliary: Named extra logits, each scored with weighted cross-entropy.
        weight: Weight of the segmentation term of ``logits``.
        ohem: Score ``logits`` with OHEM cross-entropy instead of the chosen loss kind.
    """

    logits: torch.Tensor
    kl_loss: torch.Tensor | None = None
    dl_loss: torch.Tensor | None = None
    auxiliary: Mapping[str, AuxiliaryLogits] = types.MappingProxyType({})
    weight: float = 1.0
    ohem: bool = False


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _in_float32(
    method: Callable[..., T],
) -> Callable[..., T]:
    """Run a head method in float32 with autocast off when autocast is on.

    The method takes a tensor first and any further arguments, passed on. Adjacencies,
    softmaxes, γ and the logarithms are range-sensitive; without autocast the method runs
    in the input's dtype.
    """

    @functools.wraps(method)
    def wrapper(self: nn.Module, x: torch.Tensor, *args: Any) -> T:
        device_type = x.device.type
        if _autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return method(self, x.float(), *args)
        return method(self, x, *args)

    return wrapper


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of B×c×h×w logits to ``size``."""
    return F.interpolate(logits, size, mode="bilinear", align_corners=False)


class SCGHead(nn.Module):
    """SCG block + GNN1 (C→128, BN + ReLU) + GNN2 (128→c), optional residual sum.

    Usable on its own: ``head(features)`` maps backbone features B×C×h×w to logits
    B×c×h×w; in training mode it returns a :class:`SegmentationOutput` with the SCG losses.
    It runs in two steps, ``decode(project(features))``: :meth:`project` holds every
    per-position linear map (the bulk of the head's multiply-adds), :meth:`decode` the part
    that needs the whole window (graph, propagation, residual). Under autocast both run in
    float32 (the adjacency Z·Zᵀ, γ and the logarithms are range-sensitive); outside
    autocast in the input's dtype.

    Args:
        in_channels: Feature channels C.
        num_classes: Number of classes c.
        variant: The registry row (SCG kind, GNN layers, residual).
        nodes: Optional fixed node grid (rows, cols): features are adaptive-average-pooled to
            it and the logits upsampled back to h×w. None: one node per feature position.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        variant: Variant,
        *,
        nodes: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.residual = variant.residual
        self.nodes = nodes
        self.scg = SCGBlock(in_channels, num_classes, variant.scg)
        self.gnn1 = GNN_LAYERS[variant.gnn1](in_channels, HIDDEN_FEATURES, hidden=True)
        self.gnn2 = GNN_LAYERS[variant.gnn2](HIDDEN_FEATURES, num_classes, hidden=False)

    @property
    def projected_channels(self) -> int:
        """Channels of :meth:`project`: GNN1's hidden features, then the SCG block's maps."""
        return HIDDEN_FEATURES + self.scg.projection_channels

    @_in_float32
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The head's per-position linear maps of backbone features B×C×h×w.

        GNN1's X·W and the SCG block's projection (:meth:`SCGBlock.projection_weight`), B×P×h×w.

        They do not depend on the window, so a caller running the head on many overlapping
        windows may project the features once and crop the windows from the result.

        """
        weight = torch.cat([self.gnn1.linear.weight, self.scg.projection_weight()])
        return F.conv2d(features, weight[:, :, None, None])

    @_in_float32
    def decode(self, projected: torch.Tensor) -> torch.Tensor | SegmentationOutput:
        """The rest of the head on one window's projected features B×P×h×w.

        The graph, the graph layers and the residual (what :meth:`forward` returns).
        """
        height, width = projected.shape[-2:]
        if self.nodes is not None:  # average pooling commutes with the linear projection
            projected = F.adaptive_avg_pool2d(projected, self.nodes)
        scg = self.scg(projected[:, HIDDEN_FEATURES:])
        y = self.gnn1.aggregate(to_nodes(projected[:, :HIDDEN_FEATURES]), scg.graph)
        y = self.gnn2(y, scg.graph)
        if self.residual:
            y = y + scg.residual
        logits = from_nodes(y, projected.shape[-2], projected.shape[-1])
        if self.nodes is not None:
            logits = upsample(logits, (height, width))
        if not self.training:
            return logits
        zero = logits.new_zeros(())
        kl_loss = scg.kl_loss if scg.kl_loss is not None else zero
        return SegmentationOutput(logits, kl_loss, scg.dl_loss)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | SegmentationOutput:
        """``decode(project(features))``; ``labels`` are not used by the SCG heads."""
        return self.decode(self.project(features))


class SCGNet(nn.Module):
    """ResNet trunk (stride 16) → graph head → bilinear upsampling to H×W.

    The head is an :class:`SCGHead` for SCG-Net's variants, or any head of the registry
    with the same interface (``project``, ``decode``, ``projected_channels``,
    ``num_classes``, ``forward(features, labels=None)``).

    ``forward(x, labels=None)`` takes B×C×H×W (H, W multiples of 16 give one node per 16×16
    pixels) and returns logits B×c×H×W in eval mode — exactly one tensor — or a
    :class:`SegmentationOutput` in training mode, its logits and auxiliary logits
    upsampled. ``labels`` (B×H×W) are passed on to the head; the SCG heads ignore them,
    heads that sample their graph's nodes from the labels in training need them.

    Attributes:
        variant: The registry row this network was built from.
        num_classes: Number of output classes c.
        in_channels: Number of input bands C.
        backbone: The torchvision-named ResNet trunk.
        head: The graph head.
    """

    def __init__(self, backbone: ResNetTrunk, head: nn.Module, variant: Variant) -> None:
        super().__init__()
        self.variant = variant
        self.num_classes = head.num_classes
        self.in_channels = backbone.in_channels
        self.backbone = backbone
        self.head = head

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | SegmentationOutput:
        """Logits B×c×H×W of an input B×C×H×W (with the head's terms in training mode)."""
        size = x.shape[-2:]
        out = self.head(self.backbone(x), labels)
        if not isinstance(out, SegmentationOutput):
            return upsample(out, size)
        auxiliary = {
            name: aux._replace(logits=upsample(aux.logits, size))
            for name, aux in out.auxiliary.items()
        }
        return out._replace(logits=upsample(out.logits, size), auxiliary=auxiliary)
