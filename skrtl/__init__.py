"""skrtl: scikit-learn compatible radiomics transfer learning.

Pretrained CNN features, harmonization, fine-tuning, label-shift calibration, Optuna tuning and
survival models for small multi-site medical imaging data sets.
"""

from ._backbone import (
    DEFAULT_BACKBONE,
    BackboneWeightsError,
    TransferLayer,
    backbone_data_config,
    describe_layers,
    get_transfer_layers,
    load_backbone,
)
from ._imaging import make_image_frame, read_image_frame

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneWeightsError",
    "TransferLayer",
    "__version__",
    "backbone_data_config",
    "describe_layers",
    "get_transfer_layers",
    "load_backbone",
    "make_image_frame",
    "read_image_frame",
]
