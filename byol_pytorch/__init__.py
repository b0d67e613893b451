"""byol_pytorch: BYOL self-supervised pretraining for any image backbone.

The method is here at the top (``BYOL``, its views, heads, loss, EMA, collapse alarm); the data
layer is ``byol_pytorch.data``, the training runtime ``byol_pytorch.training`` and the command
line ``byol_pytorch.app`` (docs/DESIGN.md draws the map).
"""

from ._version_check import require_torch

require_torch()  # before anything that needs torch >= 2.4

from . import _compat  # noqa: E402
from .augment import BYOLAugment  # noqa: E402
from .batchnorm import freeze_batchnorm_statistics, recalibrate_batchnorm  # noqa: E402
from .byol import BYOL  # noqa: E402
from .collapse import CollapseWarning  # noqa: E402
from .training.trainer import BYOLTrainer, MockDataset  # noqa: E402

__version__ = "1.2.0"

__all__ = [
    "BYOL",
    "BYOLAugment",
    "BYOLTrainer",
    "CollapseWarning",
    "MockDataset",
    "freeze_batchnorm_statistics",
    "recalibrate_batchnorm",
    "__version__",
]

_compat.install()
