"""``python -m common.distributed --backend B --workers N [--timeout S] -- COMMAND...``: the local
launcher on its own (``common.distributed.launch.main``); how the TF job re-enters it inside its
private network namespace."""

import sys

from common.distributed.launch import main

sys.exit(main())
