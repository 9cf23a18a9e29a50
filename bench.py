"""``python bench.py NAME ...`` from the checkout: the benchmarks' dispatcher (bench/__init__.py), the same as
the installed ``simclr-bench NAME ...``. ``python bench.py --help`` lists them."""

import sys

from simclr_dali.bench import main

if __name__ == "__main__":
    sys.exit(main())
