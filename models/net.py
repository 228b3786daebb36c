"""The SCG head and SCG-Net: backbone → SCG block → two graph layers → logits."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

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
    """One row of the variant registry (the paper's Table III).

    Attributes:
        name: Registry name.
        scg: SCG block kind (``scg``, ``scgae`` or ``scgdir``).
        gnn1: First (hidden) graph layer (``gcn`` or ``gin``).
        gnn2: Second (output) graph layer (``gcn`` or ``gin``).
        residual: Whether the SCG residual Ẑ is summed onto the GNN output.
    """

    name: str
    scg: str
    gnn1: str
    gnn2: str
    residual: bool


class SegmentationOutput(NamedTuple):
    """Training-mode output of :class:`SCGHead` and :class:`SCGNet`.

    Attributes:
        logits: B×c×H×W class scores (B×c×h×w from the head alone).
        kl_loss: L_kl, a scalar (zero for variants without it, e.g. SCGae).
        dl_loss: L_dl, a scalar.
    """

    logits: torch.Tensor
    kl_loss: torch.Tensor
    dl_loss: torch.Tensor


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _in_float32(
    method: Callable[[SCGHead, torch.Tensor], T],
) -> Callable[[SCGHead, torch.Tensor], T]:
    """Run a head method in float32 with autocast off when autocast is on.

    The adjacency Z·Zᵀ, γ and the logarithms are range-sensitive; without autocast the
    method runs in the input's dtype.
    """

    @functools.wraps(method)
    def wrapper(self: SCGHead, x: torch.Tensor) -> T:
        device_type = x.device.type
        if _autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return method(self, x.float())
        return method(self, x)

    return wrapper


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
            logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        zero = logits.new_zeros(())
        kl_loss = scg.kl_loss if scg.kl_loss is not None else zero
        return SegmentationOutput(logits, kl_loss, scg.dl_loss)

    def forward(self, features: torch.Tensor) -> torch.Tensor | SegmentationOutput:
        """Logits of backbone features (``decode(project(features))``)."""
        return self.decode(self.project(features))


class SCGNet(nn.Module):
    """SCG-Net: ResNet trunk (stride 16) → :class:`SCGHead` → bilinear upsampling to H×W.

    ``forward(x)`` takes B×C×H×W (H, W multiples of 16 give one node per 16×16 pixels) and
    returns logits B×c×H×W in eval mode — exactly one tensor — or a
    :class:`SegmentationOutput` (logits, kl_loss, dl_loss) in training mode.

    Attributes:
        variant: The registry row this network was built from.
        num_classes: Number of output classes c.
        in_channels: Number of input bands C.
        backbone: The torchvision-named ResNet trunk.
        head: The SCG head.
    """

    def __init__(self, backbone: ResNetTrunk, head: SCGHead, variant: Variant) -> None:
        super().__init__()
        self.variant = variant
        self.num_classes = head.num_classes
        self.in_channels = backbone.in_channels
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor | SegmentationOutput:
        """Logits B×c×H×W of an input B×C×H×W (with the SCG losses in training mode)."""
        size = x.shape[-2:]
        out = self.head(self.backbone(x))
        if isinstance(out, SegmentationOutput):
            logits = F.interpolate(out.logits, size, mode="bilinear", align_corners=False)
            return out._replace(logits=logits)
        return F.interpolate(out, size, mode="bilinear", align_corners=False)
