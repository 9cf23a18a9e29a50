"""``python -m simclr_dali.bench NAME ...``: the same as ``simclr-bench`` and the checkout's bench.py."""

import sys

from . import main

sys.exit(main())
