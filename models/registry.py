"""The SCG-Net variants of the paper's Table III, as rows of data, and the model factory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from models.backbone import BACKBONES, DEFAULT_BACKBONE, ResNetTrunk
from models.net import SCGHead, SCGNet, Variant

#: The paper's model, used when no variant is named.
DEFAULT_MODEL = "scg-gcn"
#: The sizes parameter counts are quoted for: the paper's 6 ISPRS classes from RGB bands.
REFERENCE_CLASSES, REFERENCE_BANDS = 6, 3


#: Every registered variant by name (paper Table III).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("scg-gcn", scg="scg", gnn1="gcn", gnn2="gcn", residual=True),
        Variant("scg-gin", scg="scg", gnn1="gin", gnn2="gin", residual=True),
        Variant("scg-gcn-gin", scg="scg", gnn1="gcn", gnn2="gin", residual=True),
        Variant("scgae-gcn", scg="scgae", gnn1="gcn", gnn2="gcn", residual=True),
        Variant("scgdir-gcn", scg="scgdir", gnn1="gcn", gnn2="gcn", residual=True),
        Variant("scgdir-gcn-gin", scg="scgdir", gnn1="gcn", gnn2="gin", residual=True),
        Variant("scg-gcn-ns", scg="scg", gnn1="gcn", gnn2="gcn", residual=False),
    )
}


def list_models() -> list[str]:
    """Names of the registered variants, the default (``scg-gcn``) first."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    """The registry row of ``name``.

    Raises:
        ValueError: Unknown name (the message lists the valid names).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    backbone: str = DEFAULT_BACKBONE,
    nodes: Sequence[int] | None = None,
) -> SCGNet:
    """Build an (untrained) SCG-Net variant.

    Args:
        name: Variant name, one of :func:`list_models`.
        num_classes: Number of output classes (≥ 1).
        in_channels: Number of input bands (≥ 1).
        backbone: ``resnet50`` (the paper's), ``resnet34`` or ``resnet18``.
        nodes: Optional fixed node grid (rows, cols), e.g. (28, 28); None: one node per
            16×16 pixels of the input.

    Returns:
        The network, in training mode (as every fresh ``nn.Module``).

    Raises:
        ValueError: Unknown name or backbone, or an invalid size (the message says which).
    """
    variant = get_variant(name)
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(BACKBONES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if nodes is not None:
        nodes = tuple(int(v) for v in nodes)
        if len(nodes) != 2 or min(nodes) < 1:
            raise ValueError(f"nodes must be two positive integers (rows, cols), got {nodes}")
    trunk = ResNetTrunk(backbone, in_channels)
    head = SCGHead(trunk.out_channels, num_classes, variant, nodes)
    return SCGNet(trunk, head, variant)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (learnable tensors' elements) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def describe_models(
    num_classes: int = REFERENCE_CLASSES,
    in_channels: int = REFERENCE_BANDS,
    backbone: str = DEFAULT_BACKBONE,
) -> list[dict[str, Any]]:
    """One plain row per registered variant, with its parameter count for the given sizes.

    The models are built on the ``meta`` device, so no weight memory is allocated.

    Returns:
        Dicts with ``name``, ``scg``, ``gnn1``, ``gnn2``, ``residual``, ``parameters`` and
        ``default``, in registry order.
    """
    rows = []
    for variant in VARIANTS.values():
        with torch.device("meta"):
            model = create_model(variant.name, num_classes, in_channels, backbone)
        rows.append(
            {
                "name": variant.name,
                "scg": variant.scg,
                "gnn1": variant.gnn1,
                "gnn2": variant.gnn2,
                "residual": variant.residual,
                "parameters": count_parameters(model),
                "default": variant.name == DEFAULT_MODEL,
            }
        )
    return rows
