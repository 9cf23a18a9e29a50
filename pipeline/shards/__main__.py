"""``python -m simclr_dali.pipeline.shards.cli ...``: the same as ``simclr-shards``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
