"""byol_pytorch: BYOL self-supervised pretraining for any image backbone."""

from .augment import BYOLAugment
from .byol import BYOL
from .collapse import CollapseWarning
from .trainer import BYOLTrainer, MockDataset

__version__ = "1.1.0"

__all__ = ["BYOL", "BYOLAugment", "BYOLTrainer", "CollapseWarning", "MockDataset", "__version__"]
