"""Row-streamed backbone features: one pass of the trunk over an area, fed a few rows at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import OUTPUT_STRIDE, BasicBlock, Bottleneck, ResNetTrunk

Op = Callable[[torch.Tensor], torch.Tensor]
#: A layer run on rows: ``(x, stride, column padding)`` → output rows.
Layer = Callable[[torch.Tensor, int, int], torch.Tensor]


class _Stage(Protocol):
    def push(self, x: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        """Take the next input rows (None.

        None) and return the output rows now complete (None: none); ``last`` marks the end of
        the input.
        """


class _Pointwise:
    """A per-position map: every input row gives one output row at once."""

    def __init__(self, op: Op) -> None:
        self.op = op

    def push(self, x: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        return None if x is None else self.op(x)


def _zero_rows(like: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` rows of zeros shaped and laid out (channels last) like ``like``."""
    shape = (like.shape[0], like.shape[1], rows, like.shape[3])
    out = torch.empty(
        shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last
    )
    return out.zero_()


class _Sliding:
    """A layer over rows: output row ``j`` reads ``kernel`` input rows from ``stride·j - top``.

    Rows outside ``[0, rows)`` are zeros.

    ``op`` runs the layer on a run of input rows without padding them (it pads the
    columns itself).
    """

    def __init__(self, op: Op, kernel: int, stride: int, top: int, rows: int) -> None:
        self.op, self.kernel, self.stride, self.top = op, kernel, stride, top
        self.rows_out = rows // stride
        self.buffer: torch.Tensor | None = None
        self.start = min(0, -top)  # input row of buffer[0]; the zeros above included
        self.done = 0  # output rows returned so far

    def push(self, x: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        if x is not None:
            if self.buffer is None:
                self.buffer = torch.cat([_zero_rows(x, self.top), x], dim=2) if self.top > 0 else x
            elif self.buffer.shape[2]:
                self.buffer = torch.cat([self.buffer, x], dim=2)
            else:
                self.buffer = x
        if self.buffer is None:
            return None
        k, s, top = self.kernel, self.stride, self.top
        have = self.start + self.buffer.shape[2]
        if last:
            missing = s * (self.rows_out - 1) - top + k - have
            if missing > 0:
                self.buffer = torch.cat([self.buffer, _zero_rows(self.buffer, missing)], dim=2)
                have += missing
        ready = min(self.rows_out, (have + top - k) // s + 1)
        if ready <= self.done:
            return None
        first = s * self.done - top - self.start
        out = self.op(self.buffer[:, :, first : s * (ready - 1) - top + k - self.start])
        keep = min(s * ready - top - self.start, self.buffer.shape[2])
        # a copy of the few rows kept, so that the run fed in can be freed
        self.buffer = self.buffer[:, :, keep:].clone()
        self.start += keep
        self.done = ready
        return out


class _Chain:
    """Stages run one after the other."""

    def __init__(self, stages: list[_Stage]) -> None:
        self.stages = stages

    def push(self, x: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        for stage in self.stages:
            x = stage.push(x, last)
        return x


class _Residual:
    """``relu(main(x) + shortcut(x))``.

    Shortcut rows wait until the main path (which lags by its kernels' reach) catches up; they
    are added piece by piece, never copied.
    """

    def __init__(self, main: _Chain, shortcut: _Stage | None) -> None:
        self.main, self.shortcut = main, shortcut
        self.waiting: list[torch.Tensor] = []

    def push(self, x: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        identity = x if self.shortcut is None else self.shortcut.push(x, last)
        if identity is not None:
            self.waiting.append(identity)
        y = self.main.push(x, last)
        if y is None:
            return None
        row = 0
        while row < y.shape[2]:
            piece = self.waiting[0]
            rows = min(piece.shape[2], y.shape[2] - row)
            y[:, :, row : row + rows].add_(piece[:, :, :rows])
            row += rows
            if rows == piece.shape[2]:
                self.waiting.pop(0)
            else:
                self.waiting[0] = piece[:, :, rows:].clone()  # frees the rest of the run
        return y.relu_()


def _relu(x: torch.Tensor) -> torch.Tensor:
    return x.relu_()


class Dihedral(NamedTuple):
    """A dihedral view of the last two axes: a left-right flip if ``flip``, then ``turns`` turns."""

    turns: int = 0
    flip: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The view of ``x``."""
        x = torch.flip(x, dims=(-1,)) if self.flip else x
        return torch.rot90(x, self.turns, dims=(-2, -1))

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """Map ``y`` computed on the view back to the original orientation."""
        y = torch.rot90(y, -self.turns, dims=(-2, -1))
        return torch.flip(y, dims=(-1,)) if self.flip else y

    def reversed_axes(self) -> tuple[bool, bool]:
        """Whether the view reverses the original rows and columns (wherever it puts them)."""
        corner = int(self.apply(torch.arange(6).reshape(2, 3))[0, 0])
        row, col = divmod(corner, 3)
        return row == 1, col == 2


class _Builder:
    """Rewrites a fused trunk's layers for one view as streamed stages over an area."""

    def __init__(self, view: Dihedral, rows: int, cols: int) -> None:
        self.view = view
        self.reverse_rows, self.reverse_cols = view.reversed_axes()
        self.rows, self.cols = rows, cols  # input size of the next layer

    def _before(self, reverse: bool, kernel: int, stride: int, padding: int) -> int:
        return kernel - padding - stride if reverse else padding

    def _sliding(self, kernel: int, stride: int, padding: int, layer: Layer) -> _Stage:
        """Stage of a layer with ``kernel``, ``stride`` and symmetric ``padding`` in the view.

        Advances the tracked size.
        """
        left = self._before(self.reverse_cols, kernel, stride, padding)
        right = stride * (self.cols // stride - 1) - left + kernel - self.cols
        top = self._before(self.reverse_rows, kernel, stride, padding)
        rows, cols = self.rows, self.cols
        self.rows, self.cols = rows // stride, cols // stride
        if kernel == stride == 1:
            return _Pointwise(lambda x: layer(x, 1, 0))
        if left >= 0 and (cols + 2 * left - kernel) // stride + 1 == self.cols:
            # the layer's own padding: what it adds past ``right`` on the right goes unused
            return _Sliding(lambda x: layer(x, stride, left), kernel, stride, top, rows)

        def op(x: torch.Tensor) -> torch.Tensor:
            x = x[..., max(-left, 0) :]
            return layer(F.pad(x, (max(left, 0), right)), stride, 0)

        return _Sliding(op, kernel, stride, top, rows)

    def conv(self, conv: nn.Conv2d) -> _Stage:
        """A convolution whose BatchNorm is fused into it."""
        if conv.bias is None:
            raise ValueError("stream a trunk with its BatchNorm fused (fuse_batchnorm())")
        weight = self.view.invert(conv.weight.detach())
        weight = weight.contiguous(memory_format=torch.channels_last)
        bias = conv.bias.detach()
        kernel, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        return self._sliding(
            kernel, stride, padding, lambda x, s, p: F.conv2d(x, weight, bias, s, (0, p))
        )

    def block(self, block: BasicBlock | Bottleneck) -> _Residual:
        """A residual block: its convolutions with ReLUs between, its shortcut."""
        rows, cols = self.rows, self.cols
        convs = [block.conv1, block.conv2] + (
            [block.conv3] if isinstance(block, Bottleneck) else []
        )
        stages: list[_Stage] = []
        for i, conv in enumerate(convs):
            stages.append(self.conv(conv))
            if i < len(convs) - 1:
                stages.append(_Pointwise(_relu))
        after = self.rows, self.cols
        shortcut = None
        if block.downsample is not None:
            self.rows, self.cols = rows, cols
            shortcut = self.conv(block.downsample[0])
        self.rows, self.cols = after
        return _Residual(_Chain(stages), shortcut)

    def trunk(self, trunk: ResNetTrunk) -> list[_Stage]:
        """The stem (convolution, ReLU, max pooling) and the blocks of layer1 to layer3."""
        stages = [self.conv(trunk.conv1), _Pointwise(_relu)]
        stages.append(self._sliding(3, 2, 1, lambda x, s, p: F.max_pool2d(x, 3, s, (0, p))))
        for layer in (trunk.layer1, trunk.layer2, trunk.layer3):
            stages += [self.block(block) for block in layer]
        return stages


class FeatureStream:
    """Features of one TTA view over a ``rows × cols`` area, fed top to bottom.

    The feature rows returned, put together, equal
    ``view.invert(module.features(view.apply(area)))`` on the whole area (up to float
    rounding) however the input rows are split. Each convolution keeps the input rows its
    next output rows still need, so every pixel goes through every layer once and memory is
    set by the width, not the height. The view is not applied to the pixels (a vertical flip
    would reverse the row order): for a dihedral map g, g⁻¹ ∘ conv(W) ∘ g is the convolution
    with kernel g⁻¹(W), and where g reverses an axis a strided layer samples the other phase
    along it (padding ``k - p - s`` before the first row or column instead of ``p``). Max
    pooling follows a ReLU, so its zero padding equals PyTorch's −∞ padding.

    Args:
        module: An ``InferenceModel`` whose backbone is a :class:`ResNetTrunk` with its
            BatchNorm fused (it uses ``mean``, ``std``, ``model.backbone`` and
            ``model.head.project``).
        view: The TTA view.
        rows: Area height in pixels (a multiple of 16).
        cols: Area width in pixels (a multiple of 16).

    Raises:
        ValueError: The area is off the 16-px grid or the trunk is not fused.
    """

    def __init__(self, module: nn.Module, view: Dihedral, rows: int, cols: int) -> None:
        if rows % OUTPUT_STRIDE or cols % OUTPUT_STRIDE or rows <= 0 or cols <= 0:
            raise ValueError(
                f"area {rows}x{cols} must be a positive multiple of {OUTPUT_STRIDE} px a side"
            )
        mean, std = module.mean, module.std
        stages: list[_Stage] = [_Pointwise(lambda x: (x - mean) / std)]
        stages += _Builder(view, rows, cols).trunk(module.model.backbone)
        stages.append(_Pointwise(module.model.head.project))
        self._chain = _Chain(stages)
        self._empty = (1, module.model.head.projected_channels, 0, cols // OUTPUT_STRIDE)
        self._device = mean.device

    def push(self, pixels: torch.Tensor | None, last: bool = False) -> torch.Tensor:
        """Feed the next rows of the area; get the feature rows now complete.

        Args:
            pixels: Standardization's input, 1 × C × h × cols, the next h rows (h may be
                any number), or None.
            last: Whether no rows follow.

        Returns:
            1 × F × h' × cols/16, the next h' feature rows (h' may be 0; all of them once
            ``last``).
        """
        y = self._chain.push(pixels, last)
        return torch.zeros(self._empty, device=self._device) if y is None else y
