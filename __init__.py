"""simclr-dali's one import namespace: the checkout's root installed as the package ``simclr_dali``.

pipeline/, model/, trainer/, evaluation/, common/ and bench/ are its subpackages (``simclr_dali.pipeline``,
...), train.py and evaluate.py its modules (``simclr_dali.train``, ``simclr_dali.evaluate``): see
pyproject.toml's ``package-dir``. Nothing is installed under a generic top-level name."""
