"""``python -m gristmill.cli ...`` runs the ``gristmill`` command (as ``torchrun -m`` needs)."""

import sys

from gristmill.cli.main import main

sys.exit(main())
