"""SGSeg-style unsupervised segmentation network: neural superpixels, a GNN, an MI loss.

After Eliasof, Ben Zikri and Treister, "Unsupervised Image Semantic Segmentation through
Superpixels and Graph Neural Networks" (2022), implemented from the description:

1. A small U-shaped CNN computes per-pixel features.
2. **Neural superpixels**: the window is cut into a regular grid of cells (the superpixel
   seeds); a convolution predicts, for every pixel, a soft assignment over the 3×3 cells
   around the pixel's own cell (the association map of neural superpixel networks such as
   Yang et al., CVPR 2020). The assignment is differentiable and trained with the rest.
3. **Nodes**: each superpixel's features are assignment-weighted means of the pixels'
   position, band values and CNN features.
4. **Graph**: each node is joined to its k most similar nodes (cosine similarity of the
   node embeddings), symmetrised; a few residual GCN blocks (:mod:`models.gnn`) mix the
   nodes, so that distant superpixels of one window exchange information.
5. The node embeddings are projected back onto the pixels through the assignment,
   concatenated with the pixel features and mixed by a 1×1 convolution into pixel
   embeddings; a 1×1 convolution gives K cluster logits, upsampled bilinearly from the
   working resolution (1/2 of the input) to the input size.

Training maximises the mutual information between the cluster assignments of two views of
the same window (:func:`mutual_information`, IIC) and keeps superpixels compact and
colour-coherent with a reconstruction loss (:attr:`ClusterOutput.superpixel_error`). The
classifier can start as a nearest-centre rule (:meth:`SGSegNet.init_clusters`), e.g. from
k-means of the untrained embeddings, so that no cluster starts (and stays) empty.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from models.gnn import GCNLayer, Graph

#: Stride of the working resolution: superpixels, the graph and the logits live on a grid
#: of 1/2 the input resolution; the logits are upsampled bilinearly to the input size.
STRIDE = 2
#: The 3×3 cells a pixel may belong to, as (row, column) offsets from its own cell.
OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
#: Added to superpixel masses before dividing (empty superpixels have mass 0).
MASS_EPS = 1e-6
#: Floor of the joint distribution's entries before the logarithm.
JOINT_EPS = 1e-8


def cell_size(window: int, superpixels: int) -> int:
    """Side of the superpixel seed cells, in pixels of the working resolution.

    About ``superpixels`` cells per ``window``-sized window, at least 2 working pixels
    (1/:data:`STRIDE` of the input's) a side.
    """
    return max(2, round(window / STRIDE / math.sqrt(superpixels)))


class ClusterOutput(NamedTuple):
    """What :class:`SGSegNet` returns in training mode.

    Attributes:
        logits: Cluster logits, B×K×H×W.
        superpixel_error: Squared error (B×⌈H/2⌉×⌈W/2⌉, working resolution) of rebuilding
            each pixel's band values and position from its superpixels' means: low when
            superpixels are compact and uniform.
    """

    logits: torch.Tensor
    superpixel_error: torch.Tensor


class _Encoded(NamedTuple):
    """Intermediate results of :class:`SGSegNet` at the working resolution."""

    embedding: torch.Tensor  # B×D×h×w, the classifier's input
    assignment: torch.Tensor  # B×9×h×w soft superpixel assignment
    pixels: torch.Tensor  # B×(2+C+D)×h×w positions, bands, CNN features
    means: torch.Tensor  # B×(2+C+D)×rows×cols their superpixel means


def _conv(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PixelEncoder(nn.Module):
    """A small U-shaped CNN: features at 1/2 and 1/4 resolution, fused at 1/2.

    A stride-2 stem, a stride-2 stage, and a 1×1 fusion at the network's working
    resolution (1/2) with ``width`` channels out.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(in_channels, width, stride=STRIDE), _conv(width, width))
        self.down = nn.Sequential(_conv(width, 2 * width, stride=2), _conv(2 * width, 2 * width))
        self.fuse = _conv(3 * width, width, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features B×width×H/2×W/2 of B×C×H×W input (H, W even)."""
        half = self.stem(x)
        quarter = self.down(half)
        up = F.interpolate(quarter, size=half.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([half, up], dim=1))


def _candidate_mask(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """9×rows×cols bool: whether cell (r + dy, c + dx) of offset k exists."""
    r = torch.arange(rows, device=device).view(1, rows, 1)
    c = torch.arange(cols, device=device).view(1, 1, cols)
    dy = torch.tensor([o[0] for o in OFFSETS], device=device).view(9, 1, 1)
    dx = torch.tensor([o[1] for o in OFFSETS], device=device).view(9, 1, 1)
    return (r + dy >= 0) & (r + dy < rows) & (c + dx >= 0) & (c + dx < cols)


def _neighbour_cells(cells: torch.Tensor) -> torch.Tensor:
    """B×D×rows×cols → B×9×D×rows×cols: cell (r + dy, c + dx)'s value at (r, c).

    One slice per offset of :data:`OFFSETS`, zero past the grid.
    """
    rows, cols = cells.shape[-2:]
    padded = F.pad(cells, (1, 1, 1, 1))
    return torch.stack(
        [padded[:, :, 1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols] for dy, dx in OFFSETS], 1
    )


def pool_cells(assignment: torch.Tensor, values: torch.Tensor, cell: int) -> torch.Tensor:
    """Assignment-weighted sums of pixel values per superpixel: Σ_p Q(p, s)·v(p).

    Args:
        assignment: B×9×H×W soft assignment of each pixel to the 3×3 cells around its
            own (:data:`OFFSETS` order); H and W multiples of ``cell``.
        values: B×D×H×W pixel values.
        cell: Cell side in pixels.

    Returns:
        B×D×(H/cell)×(W/cell) sums.
    """
    b, d, h, w = values.shape
    rows, cols = h // cell, w // cell
    weights = assignment.view(b, 9, rows, cell, cols, cell)
    # own[:, k, :, r, c]: what the pixels of cell (r, c) give to cell (r + dy, c + dx)
    own = torch.einsum("bkrics,bdrics->bkdrc", weights, values.view(b, d, rows, cell, cols, cell))
    padded = F.pad(own, (1, 1, 1, 1))
    return sum(
        padded[:, k, :, 1 - dy : 1 - dy + rows, 1 - dx : 1 - dx + cols]
        for k, (dy, dx) in enumerate(OFFSETS)
    )


def unpool_cells(assignment: torch.Tensor, cells: torch.Tensor, cell: int) -> torch.Tensor:
    """Per-pixel assignment-weighted mix of superpixel values: Σ_s Q(p, s)·v(s).

    Args:
        assignment: B×9×H×W soft assignment (see :func:`pool_cells`).
        cells: B×D×(H/cell)×(W/cell) superpixel values.
        cell: Cell side in pixels.

    Returns:
        B×D×H×W.
    """
    b, d, rows, cols = cells.shape
    weights = assignment.view(b, 9, rows, cell, cols, cell)
    mixed = torch.einsum("bkrics,bkdrc->bdrics", weights, _neighbour_cells(cells))
    return mixed.reshape(b, d, rows * cell, cols * cell)


def knn_graph(nodes: torch.Tensor, k: int) -> Graph:
    """Symmetrised k-nearest-neighbour graph of node embeddings (cosine similarity).

    Args:
        nodes: B×n×d node embeddings.
        k: Neighbours per node (capped at n − 1).

    Returns:
        The graph as :class:`models.gnn.Graph`: 0/1 adjacency without self-loops (GCN
        propagation adds the identity), zero extra self-loop weights.
    """
    b, n, _ = nodes.shape
    k = min(k, n - 1)
    adjacency = nodes.new_zeros(b, n, n)
    if k > 0:
        with torch.no_grad():
            unit = F.normalize(nodes, dim=-1)
            similarity = unit @ unit.transpose(1, 2)
            similarity.diagonal(dim1=1, dim2=2).fill_(-math.inf)
            nearest = similarity.topk(k, dim=-1).indices
            adjacency.scatter_(2, nearest, 1.0)
            adjacency = torch.maximum(adjacency, adjacency.transpose(1, 2))
    return Graph(adjacency, nodes.new_zeros(b, n))


class SGSegNet(nn.Module):
    """Superpixels → kNN graph → GCN → pixels → K cluster logits.

    Args:
        in_channels: Input bands C.
        num_clusters: Clusters K.
        cell: Superpixel seed cell side in working-resolution pixels (:func:`cell_size`).
        width: CNN feature channels D.
        hidden: Node embedding size.
        gnn_layers: Residual GCN blocks.
        neighbours: k of the kNN graph.
        position_weight: Weight of the position term (in cells²) against the band term
            (standardized values²) of the superpixel reconstruction error.

    In eval mode ``forward`` returns the logits (B×K×H×W); in training mode a
    :class:`ClusterOutput`. Inputs are standardized bands of any size; they are padded
    (replicating the edges) to a multiple of 2·``cell`` inside and the outputs cropped.
    """

    def __init__(
        self,
        in_channels: int,
        num_clusters: int,
        cell: int,
        width: int = 32,
        hidden: int = 64,
        gnn_layers: int = 3,
        neighbours: int = 8,
        position_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.cell = cell
        self.neighbours = neighbours
        self.position_weight = position_weight
        self.encoder = PixelEncoder(in_channels, width)
        self.associate = nn.Conv2d(width + in_channels, len(OFFSETS), 3, padding=1)
        self.embed = nn.Sequential(nn.Linear(2 + in_channels + width, hidden), nn.ReLU())
        self.gnn = nn.ModuleList(GCNLayer(hidden, hidden, hidden=True) for _ in range(gnn_layers))
        self.project = nn.Linear(hidden, width)
        self.mix = _conv(2 * width, width, kernel=1)
        self.classify = nn.Conv2d(width, num_clusters, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ClusterOutput:
        """Cluster logits of standardized input (eval); with the superpixel error (train)."""
        h, w = x.shape[-2:]
        parts = self._encode(x)
        logits = F.interpolate(
            self.classify(parts.embedding),
            scale_factor=STRIDE,
            mode="bilinear",
            align_corners=False,
        )[:, :, :h, :w]
        if not self.training:
            return logits
        # superpixel reconstruction of band values and positions (in cells)
        c, s = x.shape[1], self.cell
        rebuilt = unpool_cells(parts.assignment, parts.means[:, : 2 + c], s)
        error = (parts.pixels[:, : 2 + c] - rebuilt) ** 2
        error = self.position_weight * error[:, :2].sum(1) + error[:, 2:].sum(1)
        return ClusterOutput(logits, error[:, : -(-h // STRIDE), : -(-w // STRIDE)])

    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """What the cluster classifier sees: B×D×⌈H/2⌉×⌈W/2⌉ pixel embeddings.

        At the working resolution: superpixel graph features projected back, mixed with the
        CNN's.
        """
        h, w = x.shape[-2:]
        return self._encode(x).embedding[:, :, : -(-h // STRIDE), : -(-w // STRIDE)]

    def init_clusters(self, centres: torch.Tensor, temperature: float) -> None:
        """Make the classifier a nearest-centre rule: logit_k(e) = −τ·‖e − c_k‖² + const.

        The constant is common to all clusters: weights 2τ·c_k and biases −τ·‖c_k‖².

        Args:
            centres: K×D cluster centres in embedding space (e.g. k-means of
                :meth:`embeddings`).
            temperature: τ > 0; larger gives more confident initial assignments.
        """
        with torch.no_grad():
            self.classify.weight.copy_((2 * temperature * centres)[:, :, None, None])
            self.classify.bias.copy_(-temperature * (centres**2).sum(1))

    def _encode(self, x: torch.Tensor) -> _Encoded:
        b, _, h, w = x.shape
        s, step = self.cell, STRIDE * self.cell
        rows, cols = -(-h // step), -(-w // step)
        x = F.pad(x, (0, cols * step - w, 0, rows * step - h), mode="replicate")
        features = self.encoder(x)  # B×D×(rows·s)×(cols·s)
        bands = F.avg_pool2d(x, STRIDE)
        assignment = self._assignment(torch.cat([features, bands], dim=1), rows, cols)
        mass = pool_cells(assignment, bands.new_ones(b, 1, rows * s, cols * s), s) + MASS_EPS
        position = self._positions(rows, cols, x).expand(b, -1, -1, -1)
        pixels = torch.cat([position, bands, features], dim=1)
        means = pool_cells(assignment, pixels, s) / mass  # B×(2+C+D)×rows×cols
        nodes = self.embed(means.flatten(2).transpose(1, 2))  # B×n×hidden, node-major
        graph = knn_graph(nodes, self.neighbours)
        for layer in self.gnn:
            nodes = nodes + layer(nodes, graph)
        cells = self.project(nodes).transpose(1, 2).reshape(b, -1, rows, cols)
        projected = unpool_cells(assignment, cells, s)
        embedding = self.mix(torch.cat([projected, features], dim=1))
        return _Encoded(embedding, assignment, pixels, means)

    def _assignment(self, inputs: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Softmax over the 3×3 candidate cells of each pixel (missing cells excluded)."""
        b, s = inputs.shape[0], self.cell
        logits = self.associate(inputs).view(b, 9, rows, s, cols, s)
        valid = _candidate_mask(rows, cols, inputs.device).view(1, 9, rows, 1, cols, 1)
        logits = logits.masked_fill(~valid, -math.inf)
        return torch.softmax(logits, dim=1).view(b, 9, rows * s, cols * s)

    def _positions(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """1×2×H×W pixel-centre coordinates in cell units (row, column)."""
        s = self.cell
        y = (torch.arange(rows * s, device=like.device, dtype=like.dtype) + 0.5) / s
        x = (torch.arange(cols * s, device=like.device, dtype=like.dtype) + 0.5) / s
        grid = torch.stack(torch.meshgrid(y, x, indexing="ij"))
        return grid.unsqueeze(0)


def mutual_information(
    p1: torch.Tensor, p2: torch.Tensor, valid: torch.Tensor, prior: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual information of two views' cluster assignments (IIC), and an objective on it.

    IIC is Ji, Henriques and Vedaldi, "Invariant Information Clustering" (ICCV 2019).

    The joint distribution J of the two assignments is the mean over valid pixels of the
    outer products of their cluster probabilities, symmetrised; its mutual information is
    ``Σ J_ij · log(J_ij / (J_i· · J_·j))`` = H(Z) − H(Z | Z'), at most log K, reached when
    the two views agree and all K clusters are used equally.

    IIC maximises the mutual information itself, whose H(Z) term pulls towards clusters
    of equal size. With a ``prior`` π the objective is ``MI + Σ_i P_i · log π_i`` =
    −H(Z | Z') − KL(P ‖ π) (P the marginal of J): agreement between the views, with
    cluster sizes pulled towards π instead of towards equal sizes (land cover is rarely
    balanced); for a uniform π it is the mutual information minus log K.

    Args:
        p1: B×K×H×W probabilities of the first view.
        p2: B×K×H×W probabilities of the second view, aligned with the first.
        valid: B×H×W bool, pixels that count.
        prior: Optional K target cluster proportions (positive, summing to 1).

    Returns:
        (the objective to maximise, the mutual information), scalars in nats.
    """
    k = p1.shape[1]
    weight = valid.to(p1.dtype).unsqueeze(1)
    joint = torch.einsum("bkhw,blhw->kl", p1 * weight, p2) / weight.sum().clamp_min(1)
    joint = ((joint + joint.T) / 2).clamp_min(JOINT_EPS)
    marginal = joint.sum(dim=1)
    rows = marginal.view(k, 1).expand(k, k)
    cols = marginal.view(1, k).expand(k, k)
    mi = (joint * (joint.log() - rows.log() - cols.log())).sum()
    if prior is None:
        return mi, mi
    return mi + (marginal * prior.log()).sum(), mi
