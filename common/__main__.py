"""``python -m common`` runs the ``densenet`` command."""

import sys

from common.cli import main

sys.exit(main())
