"""Self-Constructing Graph blocks: SCG (variational), SCGae and SCGdir (DESIGN.md §2)."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from models.gnn import Graph

#: SCG block kinds by registry name.
SCG_KINDS = ("scg", "scgae", "scgdir")

#: Upper bound of L = log σ (the paper keeps log Σ < 1 so that 1 − L stays ≥ 0).
LOG_SIGMA_MAX = 1.0
#: Lower bound of the mean adjacency diagonal when computing γ (keeps γ finite).
MIN_MEAN_DIAGONAL = 1e-3
#: Added inside the logarithm of the diagonal log loss.
LOG_EPS = 1e-7


def to_nodes(x: torch.Tensor) -> torch.Tensor:
    """B×C×h×w → B×(h·w)×C, node-major (row by row), via permute — never a raw reshape."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def from_nodes(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """B×(h·w)×C → B×C×h×w, the inverse of :func:`to_nodes`."""
    return y.unflatten(1, (height, width)).permute(0, 3, 1, 2)


class SCGOutput(NamedTuple):
    """What an SCG block gives the head.

    Attributes:
        graph: Enhanced adjacency A + γ·diag(A) (as A and its self-loop weights).
        residual: Ẑ, B×n×c, summed onto the GNN output by variants with a residual.
        gamma: Per-sample γ, B×1×1.
        kl_loss: L_kl (scalar) in training for variational kinds, else None.
        dl_loss: L_dl (scalar) in training, else None.
    """

    graph: Graph
    residual: torch.Tensor
    gamma: torch.Tensor
    kl_loss: torch.Tensor | None
    dl_loss: torch.Tensor | None


class SCGBlock(nn.Module):
    """One SCG block of the given kind.

    A block turns backbone features B×C×h×w, projected once per position by its linear maps
    (:meth:`SCGBlock.projection_weight`), into a graph over the n = h·w positions (nodes,
    node-major order), the residual Ẑ that the head may add to its output, and — in training
    mode only — the auxiliary losses L_kl and L_dl. No loss op is built in eval mode, so an
    exported graph holds none.

    ``scg``: M = Conv3×3(F), L = min(Conv1×1(F), 1) = log σ; Z = M + σ·ε in training, M in
    eval; A = ReLU(Z·Zᵀ); residual Ẑ = γ·M⊙(1 − L); L_kl and L_dl in training.
    ``scgae``: Z = M (no L, no sampling, no L_kl); Ẑ = γ·Z.
    ``scgdir``: as ``scg`` with A = ReLU(softmax(Z over classes)·Zᵀ), not symmetric.

    In every kind γ = sqrt(1 + 1 / max(mean diag(A), 1e-3)) per sample and the adjacency is
    enhanced to A + γ·diag(A).

    Args:
        in_channels: Feature channels C of the backbone.
        num_classes: Number of classes c (the latent dimension of Z).
        kind: One of :data:`SCG_KINDS`.
    """

    def __init__(self, in_channels: int, num_classes: int, kind: str = "scg") -> None:
        super().__init__()
        if kind not in SCG_KINDS:
            raise ValueError(f"unknown SCG kind {kind!r}; valid kinds: {', '.join(SCG_KINDS)}")
        self.kind = kind
        self.mu = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.log_sigma = nn.Conv2d(in_channels, num_classes, 1) if kind != "scgae" else None
        for conv in (self.mu, self.log_sigma):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
        # Sums the nine projected taps, each shifted to its kernel position, with zero
        # padding: a fixed 3×3 convolution (9·c → c) with one 1 per output and tap.
        shifts = torch.zeros(num_classes, 9 * num_classes, 3, 3)
        for t, (i, j) in enumerate(itertools.product(range(3), repeat=2)):
            shifts[:, t * num_classes : (t + 1) * num_classes, i, j] = torch.eye(num_classes)
        self.register_buffer("tap_shifts", shifts, persistent=False)

    @property
    def projection_channels(self) -> int:
        """Rows of :meth:`projection_weight`: 9·c, plus c for a variational kind."""
        c = self.mu.out_channels
        return 9 * c + (c if self.log_sigma is not None else 0)

    def projection_weight(self) -> torch.Tensor:
        """The block's per-position linear maps of the features as one P×C matrix.

        Rows ``t·c`` to ``t·c + c − 1`` hold tap ``t = 3i + j`` of the 3×3 convolution M
        (kernel row i, column j); the last c rows, for a variational kind, the 1×1
        convolution L. Features projected by it, once per position, give M and L of any
        window through :meth:`forward`, which adds the taps shifted, with the window's own
        zero padding (:attr:`tap_shifts`) — exactly the convolutions on the window's
        features.
        """
        c, channels = self.mu.out_channels, self.mu.in_channels
        taps = self.mu.weight.permute(2, 3, 0, 1).reshape(9 * c, channels)
        if self.log_sigma is None:
            return taps
        return torch.cat([taps, self.log_sigma.weight.flatten(1)])

    def forward(self, projected: torch.Tensor) -> SCGOutput:
        """The graph of the B×P×h×w features projected by :meth:`projection_weight`."""
        c = self.mu.out_channels
        mean = F.conv2d(projected[:, : 9 * c], self.tap_shifts, self.mu.bias, padding=1)
        mean = to_nodes(mean)
        kl_loss = None
        if self.log_sigma is None:
            z = mean
            residual = mean
        else:
            log_sigma = projected[:, 9 * c :] + self.log_sigma.bias.view(1, c, 1, 1)
            log_sigma = to_nodes(log_sigma).clamp(max=LOG_SIGMA_MAX)
            z = mean
            if self.training:
                z = mean + torch.exp(log_sigma) * torch.randn_like(mean)
                kl_loss = -0.5 * torch.mean(
                    1 + 2 * log_sigma - mean.pow(2) - torch.exp(log_sigma).pow(2)
                )
            residual = mean * (1 - log_sigma)

        left = torch.softmax(z, dim=-1) if self.kind == "scgdir" else z
        adjacency = torch.bmm(left, z.transpose(1, 2)).relu_()
        diagonal = adjacency.diagonal(dim1=1, dim2=2)
        nodes = diagonal.shape[-1]
        # sum / n rather than mean(): ONNX export to opset 17 cannot lower ReduceMean here
        mean_diagonal = (diagonal.sum(dim=-1) / nodes).clamp(min=MIN_MEAN_DIAGONAL)
        gamma = torch.sqrt(1 + 1 / mean_diagonal)

        dl_loss = None
        if self.training:
            log_diagonal = torch.log(diagonal.clamp(0, 1) + LOG_EPS).sum(dim=-1)
            dl_loss = torch.mean(-gamma / nodes**2 * log_diagonal)

        gamma = gamma.view(-1, 1, 1)
        graph = Graph(adjacency, gamma.squeeze(-1) * diagonal)
        return SCGOutput(graph, gamma * residual, gamma, kl_loss, dl_loss)
