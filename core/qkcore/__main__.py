"""``python -m qkcore`` (also what ``torchrun -m qkcore`` runs)."""

import sys

from qkcore.cli import main

sys.exit(main())
