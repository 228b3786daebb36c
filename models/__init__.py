"""SCG-Net and its variants (Liu et al., IJRS 2021), MSCG and CDGC heads: geoseg's model library.

Example:
    >>> import torch
    >>> from models import create_model
    >>> model = create_model("scg-gcn", num_classes=6, in_channels=4).eval()
    >>> logits = model(torch.rand(1, 4, 448, 448))  # 1×6×448×448
"""

from models.backbone import (
    BACKBONES,
    DEFAULT_BACKBONE,
    OUTPUT_STRIDE,
    ResNetTrunk,
    WeightsError,
    load_backbone_weights,
)
from models.cdgc import CDGCHead
from models.inference import InferenceModel, InferencePart, mean_probabilities
from models.losses import (
    LOSS_KINDS,
    LossOutput,
    SegmentationLoss,
    cross_entropy_loss,
    dice_loss,
    ohem_cross_entropy,
)
from models.mscg import MultiViewSCGHead
from models.net import AuxiliaryLogits, SCGHead, SCGNet, SegmentationOutput
from models.registry import (
    DEFAULT_MODEL,
    HEADS,
    REFERENCE_BANDS,
    REFERENCE_CLASSES,
    VARIANTS,
    Variant,
    check_options,
    count_parameters,
    create_model,
    describe_models,
    get_variant,
    list_models,
    model_options,
)
from models.streaming import Dihedral, FeatureStream

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "DEFAULT_MODEL",
    "HEADS",
    "LOSS_KINDS",
    "OUTPUT_STRIDE",
    "REFERENCE_BANDS",
    "REFERENCE_CLASSES",
    "VARIANTS",
    "AuxiliaryLogits",
    "CDGCHead",
    "Dihedral",
    "FeatureStream",
    "InferenceModel",
    "InferencePart",
    "LossOutput",
    "MultiViewSCGHead",
    "ResNetTrunk",
    "SCGHead",
    "SCGNet",
    "SegmentationLoss",
    "SegmentationOutput",
    "Variant",
    "WeightsError",
    "check_options",
    "count_parameters",
    "create_model",
    "cross_entropy_loss",
    "describe_models",
    "dice_loss",
    "get_variant",
    "list_models",
    "load_backbone_weights",
    "mean_probabilities",
    "model_options",
    "ohem_cross_entropy",
]
