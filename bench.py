"""``python bench.py NAME ...`` from the checkout: the benchmarks' dispatcher (bench/__init__.py), the same as
the installed ``simclr-bench NAME ...``. ``python bench.py --help`` lists them."""

import runpy

if __name__ == "__main__":
    runpy.run_module("simclr_dali.bench", run_name="__main__", alter_sys=True)
