"""The model variants as rows of data (SCG-Net's Table III, MSCG, CDGC) and the model factory."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from models.backbone import BACKBONES, DEFAULT_BACKBONE, ResNetTrunk
from models.cdgc import CDGCHead
from models.mscg import MultiViewSCGHead
from models.net import SCGHead, SCGNet, Variant

#: The paper's model, used when no variant is named.
DEFAULT_MODEL = "scg-gcn"
#: The sizes parameter counts are quoted for: the paper's 6 ISPRS classes from RGB bands.
REFERENCE_CLASSES, REFERENCE_BANDS = 6, 3

#: Head classes by :attr:`Variant.head`: ``scg`` (SCG-Net), ``mscg`` (MSCG-Net's three
#: views of the SCG head) and ``cdgc`` (class-wise dynamic graph convolution). Each takes
#: ``(in_channels, num_classes, variant)`` and its options as keyword-only arguments.
HEADS: dict[str, type[nn.Module]] = {
    "scg": SCGHead,
    "mscg": MultiViewSCGHead,
    "cdgc": CDGCHead,
}


#: Every registered variant by name: paper Table III, then the other graph heads.
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
        Variant("mscg-gcn", head="mscg", scg="scg", gnn1="gcn", gnn2="gcn", residual=True),
        Variant("cdgc", head="cdgc"),
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


def model_options(name: str) -> dict[str, Any]:
    """The options of variant ``name`` with their defaults.

    They are the keyword arguments of :func:`create_model` beyond the sizes, saved as a
    checkpoint's ``model.options``.

    Raises:
        ValueError: Unknown name.
    """
    parameters = inspect.signature(HEADS[get_variant(name).head]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_options(name: str, options: Iterable[str]) -> None:
    """Refuse option names that variant ``name`` does not have.

    Raises:
        ValueError: Unknown name or option (the message lists the valid options).
    """
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"model {name} has no option {', '.join(unknown)}; valid options: "
            f"{', '.join(valid) or 'none'}"
        )


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    backbone: str = DEFAULT_BACKBONE,
    nodes: Sequence[int] | None = None,
    **options: Any,
) -> SCGNet:
    """Build an (untrained) model variant.

    Args:
        name: Variant name, one of :func:`list_models`.
        num_classes: Number of output classes (≥ 1).
        in_channels: Number of input bands (≥ 1).
        backbone: ``resnet50`` (the paper's), ``resnet34`` or ``resnet18``.
        nodes: Optional fixed node grid (rows, cols) of the SCG heads, e.g. (28, 28); None:
            one node per 16×16 pixels of the input.
        **options: The head's other options (:func:`model_options`), e.g. ``keep=0.3``
            for ``cdgc``.

    Returns:
        The network, in training mode (as every fresh ``nn.Module``).

    Raises:
        ValueError: Unknown name, backbone or option, or an invalid size or option value
            (the message says which).
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
        options["nodes"] = nodes
    check_options(name, options)
    trunk = ResNetTrunk(backbone, in_channels)
    head = HEADS[variant.head](trunk.out_channels, num_classes, variant, **options)
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
        Dicts with ``name``, ``head``, ``scg``, ``gnn1``, ``gnn2``, ``residual`` (None
        for heads without an SCG block), ``options`` (name → default), ``parameters``
        and ``default``, in registry order.
    """
    rows = []
    for variant in VARIANTS.values():
        with torch.device("meta"):
            model = create_model(variant.name, num_classes, in_channels, backbone)
        rows.append(
            {
                "name": variant.name,
                "head": variant.head,
                "scg": variant.scg,
                "gnn1": variant.gnn1,
                "gnn2": variant.gnn2,
                "residual": variant.residual,
                "options": model_options(variant.name),
                "parameters": count_parameters(model),
                "default": variant.name == DEFAULT_MODEL,
            }
        )
    return rows
