"""Parity of exported graphs with PyTorch: the check every export passes before it is written."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from geoseg_cli.inference.onnx_runtime import create_session
from models import OUTPUT_STRIDE, InferenceModel, mean_probabilities


def parity_inputs(module: InferenceModel, shapes: list[tuple[int, ...]]) -> Iterator[torch.Tensor]:
    """The seeded random inputs of the parity check (the same on every call).

    Band values drawn around the training data's band means with its standard deviations,
    clipped to [0, 1], as the model sees them in use. (Uniform [0, 1) values are tens of
    standard deviations off for imagery such as 11-bit pan scaled by 1/10000, where activations,
    and float32 rounding with them, grow far beyond anything real input produces.)
    """
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        noise = torch.randn(shape, generator=generator)
        yield (module.mean + module.std * noise).clamp(0, 1)


def parity(
    module: InferenceModel, path: Path, shapes: list[tuple[int, ...]]
) -> tuple[float, float]:
    """Max abs probability difference and argmax agreement, ONNX Runtime vs PyTorch."""
    session = create_session(path, ["CPUExecutionProvider"])
    diff, agree, total = 0.0, 0, 0
    for x in parity_inputs(module, shapes):
        with torch.inference_mode():
            expected = module(x).numpy()
        (actual,) = session.run(None, {"image": x.numpy()})
        diff = max(diff, float(np.abs(actual.astype(np.float32) - expected).max()))
        agree += int((actual.argmax(1) == expected.argmax(1)).sum())
        total += expected.shape[0] * expected.shape[2] * expected.shape[3]
    return diff, agree / total


def split_parity(
    module: InferenceModel, backbone: Path, head: Path, shapes: list[tuple[int, ...]]
) -> tuple[float, float]:
    """Parity of the backbone and head graphs with PyTorch.

    ONNX Runtime head(backbone(x)), through :func:`mean_probabilities`, vs PyTorch's whole
    network (max abs probability difference), and the backbone alone on a tile wider
    and taller than the window vs PyTorch's features (max abs difference relative to the
    largest feature).
    """
    providers = ["CPUExecutionProvider"]
    backbone_session = create_session(backbone, providers)
    head_session = create_session(head, providers)
    diff = 0.0
    for x in parity_inputs(module, shapes):
        with torch.inference_mode():
            expected = module(x).numpy()
        (features,) = backbone_session.run(None, {"image": x.numpy()})
        (logits,) = head_session.run(None, {"features": features})
        logits = torch.from_numpy(logits.astype(np.float32))
        actual = np.stack([mean_probabilities(item[None]).numpy() for item in logits])
        diff = max(diff, float(np.abs(actual - expected).max()))
    channels, window = shapes[0][1], shapes[0][-1]
    (tile,) = parity_inputs(module, [(1, channels, window + 2 * OUTPUT_STRIDE, 2 * window)])
    with torch.inference_mode():
        expected = module.features(tile).numpy()
    (actual,) = backbone_session.run(None, {"image": tile.numpy()})
    relative = float(np.abs(actual.astype(np.float32) - expected).max() / np.abs(expected).max())
    return diff, relative


def float32_error(module: InferenceModel, shapes: list[tuple[int, ...]]) -> float:
    """Max abs difference between PyTorch in float32 and in float64 on the parity inputs.

    The rounding noise any float32 runtime has on this model.
    """
    reference = copy.deepcopy(module).double()
    error = 0.0
    with torch.inference_mode():
        for x in parity_inputs(module, shapes):
            exact = reference(x.double())
            error = max(error, float((module(x).double() - exact).abs().max()))
    return error
