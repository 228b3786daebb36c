"""Label propagation by a 2-layer GCN trained per image on a sparse graph (after WSGCN)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from models.partial import entropy


@dataclass(frozen=True)
class PropagationConfig:
    """How the per-image GCN is trained.

    Attributes:
        hidden: Hidden features of the first GCN layer.
        steps: Adam steps.
        lr: Adam learning rate.
        weight_decay: L2 penalty on the GCN weights (Adam's weight decay).
        entropy_weight: Weight of the entropy of the unseeded nodes' predictions.
        smoothness_weight: Weight of the Laplacian smoothness over the graph's affinities.
    """

    hidden: int = 32
    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 5e-4
    entropy_weight: float = 0.1
    smoothness_weight: float = 1.0


def _csr(coo: torch.Tensor) -> torch.Tensor:
    """A COO tensor as CSR (duplicates summed), without torch's "beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return coo.coalesce().to_sparse_csr()


class _SymmetricProduct(torch.autograd.Function):
    """Â·X for a symmetric sparse Â: the gradient is Â·G (no transpose of Â needed)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, x: torch.Tensor):
        ctx.a = a
        return a @ x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):
        return None, ctx.a @ grad


@dataclass
class GraphBatch:
    """B graphs of N nodes each, as one block-diagonal graph over B·N nodes.

    Attributes:
        src: Edge sources (indexes into the B·N nodes; image b holds nodes b·N ... b·N+N−1).
        dst: Edge targets; the graph is undirected when every edge appears both ways.
        weight: Edge affinities in (0, 1].
        num_graphs: B.
        num_nodes: N, nodes per graph.
    """

    src: torch.Tensor
    dst: torch.Tensor
    weight: torch.Tensor
    num_graphs: int
    num_nodes: int

    def normalized_adjacency(self) -> torch.Tensor:
        """Â = D^-1/2 (A + I) D^-1/2 as a sparse CSR (B·N)×(B·N) tensor.

        Duplicate edges add; Â is symmetric when every edge appears both ways with one weight.
        """
        total = self.num_graphs * self.num_nodes
        loops = torch.arange(total, device=self.src.device)
        rows = torch.cat([self.dst, loops])
        cols = torch.cat([self.src, loops])
        values = torch.cat([self.weight, torch.ones_like(loops, dtype=self.weight.dtype)])
        degree = torch.zeros(total, dtype=values.dtype, device=values.device)
        degree.index_add_(0, rows, values)
        scale = degree.clamp(min=1e-12).rsqrt()
        values = values * scale[rows] * scale[cols]
        coo = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values, (total, total), check_invariants=False
        )
        return _csr(coo)

    def smoothness(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The per-graph Laplacian smoothness of (B·N)×K probabilities P, as a function.

        Σ w ‖p_src − p_dst‖² / Σ w over the undirected edges, computed as Σ_i p_i·(L·P)_i per
        graph with L = D − W by one sparse product (every edge must appear both ways).
        """
        total = self.num_graphs * self.num_nodes
        nodes = torch.arange(total, device=self.src.device)
        degree = self.weight.new_zeros(total).index_add_(0, self.src, self.weight)
        laplacian = torch.sparse_coo_tensor(
            torch.stack([torch.cat([self.src, nodes]), torch.cat([self.dst, nodes])]),
            torch.cat([-self.weight, degree]),
            (total, total),
            check_invariants=False,
        )
        laplacian = _csr(laplacian)
        pairs = degree.reshape(self.num_graphs, -1).sum(1) / 2

        def smoothness(probs: torch.Tensor) -> torch.Tensor:
            quadratic = (probs * _SymmetricProduct.apply(laplacian, probs)).sum(1)
            per_graph = quadratic.reshape(self.num_graphs, -1).sum(1)
            return per_graph / pairs.clamp(min=1e-12)

        return smoothness


def _glorot(generators: list[torch.Generator], rows: int, cols: int) -> torch.Tensor:
    """One Glorot-uniform rows×cols matrix per generator, stacked (B×rows×cols, CPU)."""
    bound = math.sqrt(6.0 / (rows + cols))
    return torch.stack([(torch.rand(rows, cols, generator=g) * 2 - 1) * bound for g in generators])


def _aggregate(adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Â·X for B×N×C node values of the block-diagonal graph."""
    batch, nodes = x.shape[:2]
    flat = _SymmetricProduct.apply(adjacency, x.reshape(batch * nodes, -1).contiguous())
    return flat.reshape(batch, nodes, -1)


def _forward(
    adjacency: torch.Tensor, aggregated: torch.Tensor, params: list[torch.Tensor]
) -> torch.Tensor:
    """Two GCN layers Â·X·W + b with a ReLU between them: Â·X (B×N×F) to B×N×K logits.

    Â·X is fixed, so it is computed once.
    """
    w1, b1, w2, b2 = params
    hidden = torch.relu(torch.bmm(aggregated, w1) + b1)
    return _aggregate(adjacency, torch.bmm(hidden, w2)) + b2


def _class_balance(seeds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B×N node weights: 1 / (seeds of the node's class × seeded classes), 0 if unseeded.

    They sum to 1 over the seeded nodes of each graph that has seeds.
    """
    seeded = seeds >= 0
    onehot = F.one_hot(seeds.clamp(min=0), num_classes) * seeded.unsqueeze(-1)
    counts = onehot.sum(1).to(torch.float32)  # B×K
    classes = (counts > 0).sum(1, keepdim=True).clamp(min=1)
    per_class = torch.where(counts > 0, 1.0 / (counts * classes).clamp(min=1), 0.0)
    return per_class.gather(1, seeds.clamp(min=0)) * seeded


def propagate(
    features: torch.Tensor,
    graph: GraphBatch,
    seeds: torch.Tensor,
    num_classes: int,
    generators: list[torch.Generator],
    config: PropagationConfig = PropagationConfig(),
) -> torch.Tensor:
    """Train one 2-layer GCN per graph on its seeds and return every node's probabilities.

    WSGCN (Pan, Lu, Lee, Peng, "Weakly-supervised image semantic segmentation using graph
    convolutional networks", ICME 2021) completes sparse seed labels by training a small GCN
    separately for every image, as semi-supervised node classification: cross-entropy on the
    seeded nodes plus an entropy term on the others and a Laplacian smoothness term over the
    graph's colour and position affinities (:mod:`models.partial`).

    Here a batch of B images of N nodes each is one block-diagonal graph given by an edge list,
    never a dense N×N matrix: aggregation is a sparse matrix product. Each image has its own
    GCN weights (B×F×H tensors); since the loss is a sum of per-image losses and Adam updates
    every weight element on its own, each image's GCN trains exactly as it would alone.

    The loss of graph b is the class-balanced cross-entropy over its seeded nodes (the mean
    over its seeded classes of their nodes' mean: how densely a class was seeded is no
    prior of how much of it there is), plus
    ``entropy_weight`` × the mean entropy over its other nodes, plus ``smoothness_weight`` ×
    its Laplacian smoothness (:meth:`GraphBatch.smoothness`); the batch minimises their sum.
    Every edge should appear both ways (an undirected graph), as the smoothness counts the
    edges with src < dst.

    Args:
        features: B×N×F node features (on the device to train on).
        graph: The B graphs' edges (same device).
        seeds: B×N class ids, −1 for unseeded nodes.
        num_classes: K.
        generators: One CPU generator per graph for its initial weights (seeded by the
            caller: the result depends on nothing else).
        config: Training settings.

    Returns:
        B×N×K softmax probabilities (detached).
    """
    batch, nodes, channels = features.shape
    device = features.device
    params = [
        _glorot(generators, channels, config.hidden).to(device),
        torch.zeros(batch, 1, config.hidden, device=device),
        _glorot(generators, config.hidden, num_classes).to(device),
        torch.zeros(batch, 1, num_classes, device=device),
    ]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    adjacency = graph.normalized_adjacency()
    smoothness = graph.smoothness()
    aggregated = _aggregate(adjacency, features)
    seeded = seeds >= 0
    balance = _class_balance(seeds, num_classes)
    n_open = (~seeded).sum(1).clamp(min=1)
    target = seeds.clamp(min=0).reshape(-1)
    for _ in range(config.steps):
        logits = _forward(adjacency, aggregated, params)
        flat = logits.reshape(batch * nodes, num_classes)
        ce = F.cross_entropy(flat, target, reduction="none").reshape(batch, nodes)
        ce = (ce * balance).sum(1)
        ent = (entropy(logits, dim=-1) * ~seeded).sum(1) / n_open
        smooth = smoothness(torch.softmax(flat, 1))
        loss = (ce + config.entropy_weight * ent + config.smoothness_weight * smooth).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.softmax(_forward(adjacency, aggregated, params), -1)
