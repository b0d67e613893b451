"""byol_pytorch: BYOL self-supervised pretraining for any image backbone.

The method is here at the top (``BYOL``, its views, heads, loss, EMA, collapse alarm); the data
layer is ``byol_pytorch.data``, the training runtime ``byol_pytorch.training`` and the command
line ``byol_pytorch.app`` (docs/DESIGN.md draws the map).
"""

from . import _compat
from .augment import BYOLAugment
from .batchnorm import recalibrate_batchnorm
from .byol import BYOL
from .collapse import CollapseWarning
from .training.trainer import BYOLTrainer, MockDataset

__version__ = "1.2.0"

__all__ = [
    "BYOL",
    "BYOLAugment",
    "BYOLTrainer",
    "CollapseWarning",
    "MockDataset",
    "recalibrate_batchnorm",
    "__version__",
]

_compat.install()
