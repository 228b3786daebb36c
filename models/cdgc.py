"""CDGC: class-wise dynamic graph convolution (Hu et al., ECCV 2020) on the ResNet trunk.

Implemented from the paper's formulas. On backbone features F (B×C×h×w, n = h·w
positions, M classes):

- X = ReLU(BN(Conv1×1(F))), D channels; coarse logits P = Conv1×1(X).
- Nodes of class m: the positions that P assigns to m (argmax). In training, with dynamic
  sampling, C ∪ G − (1 − r)·(C ∩ G) instead, with C the coarse mask of m, G the ground
  truth of m at feature resolution (:func:`cell_labels`) and r the kept share of the easy
  positives C ∩ G (:func:`sample_nodes`); positions without a valid label are never nodes.
- A_m = row-softmax of φ(x_i)ᵀ φ′(x_j) over the nodes j of class m, for the nodes i of m;
  the rows of other positions are zero (:func:`class_adjacency`: an additive −∞ mask, no
  index lists, so the graph exports to ONNX with a dynamic batch).
- Group graph convolution: Z_m = ReLU(A_m X W_m), one D×D weight per class; the M class
  features (zero off their class's nodes) are fused by Conv1×1 + BN + ReLU (M·D → D),
  concatenated with X, and a 1×1 classifier gives the refined logits.
- Training loss: 0.6·CE(P) + 0.7·OHEM-CE(refined) + 0.4·CE(aux), the auxiliary classifier
  a Conv1×1 on F (layer3, the trunk's output here); the weights are options.

Every map before the graph is per position, so :meth:`CDGCHead.project` holds them (X, P,
φ(X), φ′(X)) and :meth:`CDGCHead.decode` the window-dependent rest, as for the SCG heads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from models.net import AuxiliaryLogits, SegmentationOutput, Variant, _in_float32
from models.scg import to_nodes

#: Channels D of the reduced features X: a quarter of ResNet-50's layer3, as the paper
#: reduces its 2048 channels to 512.
REDUCED_CHANNELS = 256


def cell_labels(labels: torch.Tensor, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """The label of each feature position: the majority of its pixels' labels.

    Args:
        labels: B×H×W integer labels; values outside [0, num_classes) (e.g. an ignore
            index) are not a class.
        num_classes: Number of classes M.
        size: Feature grid (h, w).

    Returns:
        B×(h·w) int64 labels, node-major; ``num_classes`` where pixels without a class are
        the majority (ties go to the lowest class).
    """
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)
    votes = F.one_hot(torch.where(valid, labels, num_classes), num_classes + 1)
    votes = F.adaptive_avg_pool2d(votes.permute(0, 3, 1, 2).float(), size)
    return votes.argmax(dim=1).flatten(1)


def sample_nodes(
    coarse: torch.Tensor,
    truth: torch.Tensor,
    keep: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dynamic sampling of each class's nodes: C ∪ G − (1 − r)·(C ∩ G).

    Of each class's easy positives C ∩ G (per sample), round(r·|C ∩ G|) are kept (halves
    round up) and the others dropped, chosen uniformly at random: one random key per
    position, the easy positives with the smallest keys are dropped. Hard positives (G
    only) and false positives (C only) are always kept; positions without a ground-truth
    class (every G false: ignore-index pixels) are never nodes.

    Args:
        coarse: B×M×n bool, the coarse prediction's class masks C.
        truth: B×M×n bool, the ground truth's class masks G (at most one class each).
        keep: r, the kept share of the easy positives, in [0, 1].
        generator: Random generator of the keys (default: torch's global one, which
            ``geoseg train`` seeds and restores on ``--resume``).

    Returns:
        B×M×n bool node masks.
    """
    easy = coarse & truth
    keys = torch.rand(truth.shape[0], 1, truth.shape[2], generator=generator, device=truth.device)
    rank = torch.where(easy, keys, 2.0).argsort(dim=-1).argsort(dim=-1)
    count = easy.sum(dim=-1, keepdim=True)
    dropped = count - torch.floor(keep * count + 0.5).long()
    valid = truth.any(dim=1, keepdim=True)
    return (coarse | truth) & valid & ~(rank < dropped)


def class_adjacency(similarity: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """A_m: softmax of each row of ``similarity`` over the nodes of class m.

    Rows of positions that are nodes of m sum to 1 over the nodes of m and are 0 at other
    positions; rows of other positions are 0. A class without nodes gets an all-zero A_m
    (its additive mask is dropped, so no row is all −∞ and nothing becomes NaN).

    Args:
        similarity: B×n×n, φ(x_i)ᵀ φ′(x_j).
        nodes: B×M×n bool node masks.

    Returns:
        B×M×n×n adjacencies.
    """
    # a sum, not any(): ONNX export to opset 17 cannot lower the ReduceMax of any() here
    present = nodes.to(similarity.dtype).sum(dim=-1, keepdim=True) > 0
    blocked = torch.where(~nodes & present, float("-inf"), 0.0).to(similarity.dtype)
    weights = torch.softmax(similarity.unsqueeze(1) + blocked.unsqueeze(2), dim=-1)
    return weights * nodes.unsqueeze(-1).to(similarity.dtype)


def _number(name: str, value: Any, low: float, high: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        bounds = f"in [{low:g}, {high:g}]" if high < float("inf") else f"≥ {low:g}"
        raise ValueError(f"cdgc option {name} must be a number {bounds}, got {value!r}")
    return float(value)


class CDGCHead(nn.Module):
    """Class-wise dynamic graph convolution head (see the module docstring).

    ``head(features, labels)`` maps backbone features B×C×h×w to refined logits B×M×h×w in
    eval mode; in training it returns a :class:`SegmentationOutput` (refined logits
    scored with OHEM, the coarse and auxiliary logits) and needs the labels B×H×W when
    dynamic sampling is on. Like the SCG heads it runs as ``decode(project(features))``;
    under autocast both run in float32.

    Args:
        in_channels: Feature channels C.
        num_classes: Number of classes M.
        variant: The registry row (cdgc's has no settings; taken as every head takes it).
        channels: D, channels of the reduced features (even: φ and φ′ have D/2).
        keep: r, the kept share of the easy positives in dynamic sampling.
        dynamic_sampling: Sample the nodes from coarse mask and labels in training; off,
            training uses the coarse mask as inference does.
        coarse_weight: Weight of the coarse logits' cross-entropy.
        refined_weight: Weight of the refined logits' OHEM cross-entropy.
        aux_weight: Weight of the auxiliary classifier's cross-entropy.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        variant: Variant,
        *,
        channels: int = REDUCED_CHANNELS,
        keep: float = 0.5,
        dynamic_sampling: bool = True,
        coarse_weight: float = 0.6,
        refined_weight: float = 0.7,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2:
            raise ValueError(f"cdgc option channels must be an even integer ≥ 2, got {channels!r}")
        if channels % 2:
            raise ValueError(f"cdgc option channels must be even (φ has half), got {channels}")
        if not isinstance(dynamic_sampling, bool):
            raise ValueError(
                f"cdgc option dynamic_sampling must be true or false, got {dynamic_sampling!r}"
            )
        self.keep = _number("keep", keep, 0.0, 1.0)
        self.coarse_weight = _number("coarse_weight", coarse_weight, 0.0)
        self.refined_weight = _number("refined_weight", refined_weight, 0.0)
        self.aux_weight = _number("aux_weight", aux_weight, 0.0)
        self.dynamic_sampling = dynamic_sampling
        self.num_classes = num_classes
        self.channels = channels
        embedding = channels // 2
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.coarse = nn.Conv2d(channels, num_classes, 1)
        self.phi = nn.Conv2d(channels, embedding, 1, bias=False)
        self.phi_prime = nn.Conv2d(channels, embedding, 1, bias=False)
        self.graph_weight = nn.Parameter(torch.empty(num_classes, channels, channels))
        nn.init.xavier_uniform_(self.graph_weight)
        self.fuse = nn.Sequential(
            nn.Conv2d(num_classes * channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(2 * channels, num_classes, 1)
        self.aux = nn.Conv2d(in_channels, num_classes, 1)

    @property
    def projected_channels(self) -> int:
        """Channels of :meth:`project`: X (D), P (M), φ(X) and φ′(X) (D/2 each)."""
        return 2 * self.channels + self.num_classes

    @_in_float32
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The head's per-position maps of backbone features B×C×h×w.

        X, P, φ(X), φ′(X) concatenated, B×(2D + M)×h×w. They do not depend on the window.
        """
        x = self.reduce(features)
        return torch.cat([x, self.coarse(x), self.phi(x), self.phi_prime(x)], dim=1)

    @_in_float32
    def decode(
        self, projected: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | SegmentationOutput:
        """The graph part on one window's projected features B×(2D + M)×h×w.

        Refined logits B×M×h×w in eval mode, a :class:`SegmentationOutput` in training
        (``labels`` B×H×W are needed there when dynamic sampling is on).
        """
        d, m = self.channels, self.num_classes
        x, coarse = projected[:, :d], projected[:, d : d + m]
        theta, theta_prime = projected[:, d + m : d + m + d // 2], projected[:, d + m + d // 2 :]
        batch, _, height, width = projected.shape
        nodes = self._nodes(coarse, labels)
        similarity = torch.matmul(to_nodes(theta), to_nodes(theta_prime).transpose(1, 2))
        adjacency = class_adjacency(similarity, nodes)  # B×M×n×n
        aggregated = torch.matmul(adjacency, to_nodes(x).unsqueeze(1))  # B×M×n×D
        z = torch.relu(torch.matmul(aggregated, self.graph_weight))
        z = z.transpose(2, 3).reshape(batch, m * d, height, width)  # class-major channels
        refined = self.classifier(torch.cat([x, self.fuse(z)], dim=1))
        if not self.training:
            return refined
        return SegmentationOutput(
            refined,
            auxiliary={"coarse": AuxiliaryLogits(coarse, self.coarse_weight)},
            weight=self.refined_weight,
            ohem=True,
        )

    def _nodes(self, coarse: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """B×M×n node masks: the coarse argmax, or :func:`sample_nodes` in training."""
        classes = torch.arange(self.num_classes, device=coarse.device).view(1, -1, 1)
        predicted = coarse.argmax(dim=1).flatten(1).unsqueeze(1) == classes
        if not (self.training and self.dynamic_sampling):
            return predicted
        if labels is None:
            raise ValueError(
                "cdgc's dynamic sampling needs the labels in training: call "
                "net(images, labels), or build it with dynamic_sampling=False"
            )
        truth = cell_labels(labels, self.num_classes, coarse.shape[-2:]).unsqueeze(1) == classes
        return sample_nodes(predicted, truth, self.keep)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | SegmentationOutput:
        """Refined logits of backbone features; in training with the auxiliary logits too."""
        out = self.decode(self.project(features), labels)
        if not self.training:
            return out
        aux = AuxiliaryLogits(self.aux(features), self.aux_weight)
        return out._replace(auxiliary={**out.auxiliary, "aux": aux})
