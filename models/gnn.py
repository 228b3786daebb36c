"""Graph layers on the self-constructed graph: GCN and GIN (DESIGN.md §2)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

#: Added to the degrees before the inverse square root (DESIGN.md §2).
DEGREE_EPS = 1e-5


class Graph(NamedTuple):
    """The enhanced adjacency A + diag(self_loops) of a batch of graphs.

    Node features are B×n×d tensors (node-major). The graph is kept as its two parts, the
    learned adjacency A (B×n×n) and the self-loop weights γ·diag(A) (B×n) that the SCG block
    adds to it, so the enhanced adjacency A + γ·diag(A) and the identity terms of the layers
    are applied without materialising n×n identity or diagonal matrices.

    Attributes:
        adjacency: A = ReLU(Z·Zᵀ) (or the directed form), B×n×n, non-negative.
        self_loops: γ·diag(A), B×n, the weight the SCG block adds on the diagonal.
    """

    adjacency: torch.Tensor
    self_loops: torch.Tensor


#: Below this many features per node :func:`aggregate_nodes` multiplies transposed.
NARROW_FEATURES = 16


def aggregate_nodes(adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A·X for B×n×n A and B×n×d X.

    Narrow X (d < :data:`NARROW_FEATURES`, e.g. GNN2's d = classes) is multiplied as
    (Xᵀ·Aᵀ)ᵀ, the same sums, which MKL's batched product runs several times faster.
    """
    if x.shape[-1] < NARROW_FEATURES:
        return torch.bmm(x.transpose(1, 2), adjacency.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(adjacency, x)


def gcn_propagate(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """Â·X with Â = D_r^-1/2 (A + I) D_c^-1/2 (row and column degrees of A + I).

    For a symmetric A this is the usual D^-1/2 (A + I) D^-1/2.

    Args:
        graph: Enhanced adjacency (A plus its self-loop weights).
        x: Node features B×n×d.

    Returns:
        Aggregated features B×n×d.
    """
    adjacency, self_loops = graph
    diagonal = self_loops + 1.0  # the enhancement plus the identity of A + I
    row = (adjacency.sum(dim=-1) + diagonal + DEGREE_EPS).rsqrt().unsqueeze(-1)
    col = (adjacency.sum(dim=-2) + diagonal + DEGREE_EPS).rsqrt().unsqueeze(-1)
    scaled = col * x
    return row * (aggregate_nodes(adjacency, scaled) + diagonal.unsqueeze(-1) * scaled)


def gin_propagate(graph: Graph, x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """((1 + ω)·I + A)·X with the enhanced, un-normalised adjacency (paper eq. 5).

    Args:
        graph: Enhanced adjacency (A plus its self-loop weights).
        x: Node features B×n×d.
        omega: Learnable scalar ω.

    Returns:
        Aggregated features B×n×d.
    """
    adjacency, self_loops = graph
    diagonal = self_loops + 1.0 + omega
    return aggregate_nodes(adjacency, x) + diagonal.unsqueeze(-1) * x


class GraphLayer(nn.Module):
    """Shared part of the graph layers: Y = propagate(X·W) + b, then optional BN + ReLU.

    X·W is computed before aggregating (same result as aggregating first, fewer FLOPs since
    the layers shrink the feature dimension). A hidden layer applies BatchNorm over the
    features (statistics across batch and nodes) and ReLU; an output layer applies neither.

    Attributes:
        kind: ``"gcn"`` or ``"gin"``.
    """

    kind: str

    def __init__(self, in_features: int, out_features: int, hidden: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.norm = nn.BatchNorm1d(out_features) if hidden else None
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def propagate(self, graph: Graph, x: torch.Tensor) -> torch.Tensor:
        """Aggregate node features over the graph."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        """Y = propagate(X·W) + b, then BN + ReLU in a hidden layer."""
        return self.aggregate(nn.functional.linear(x, self.linear.weight), graph)

    def aggregate(self, xw: torch.Tensor, graph: Graph) -> torch.Tensor:
        """The layer after its weight product.

        Propagate X·W (B×n×d, bias not yet added) over the graph, add the bias, then BN + ReLU
        in a hidden layer.

        X·W is per node, so a caller may compute it once for many graphs (the SCG head does
        for overlapping windows).

        """
        y = self.propagate(graph, xw) + self.linear.bias
        if self.norm is not None:
            y = torch.relu(self.norm(y.transpose(1, 2)).transpose(1, 2))
        return y


class GCNLayer(GraphLayer):
    """Graph convolution: Y = Â·X·W + b with the normalised adjacency Â."""

    kind = "gcn"

    def propagate(self, graph: Graph, x: torch.Tensor) -> torch.Tensor:
        """The layer's aggregation of node features over the graph."""
        return gcn_propagate(graph, x)


class GINLayer(GraphLayer):
    """Graph isomorphism layer: Y = ((1 + ω)·I + A)·X·W + b, ω learnable (init 0)."""

    kind = "gin"

    def __init__(self, in_features: int, out_features: int, hidden: bool) -> None:
        super().__init__(in_features, out_features, hidden)
        self.omega = nn.Parameter(torch.zeros(()))

    def propagate(self, graph: Graph, x: torch.Tensor) -> torch.Tensor:
        """The layer's aggregation of node features over the graph."""
        return gin_propagate(graph, x, self.omega)


#: Graph layer classes by registry name.
GNN_LAYERS: dict[str, type[GraphLayer]] = {"gcn": GCNLayer, "gin": GINLayer}
