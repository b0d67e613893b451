"""``python -m byol_pytorch ...`` runs the ``byol-pytorch`` command (also under torchrun)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
