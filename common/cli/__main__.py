"""``python -m common.cli``, the same as ``python -m common`` and ``densenet``."""

import sys

from common.cli import main

sys.exit(main())
