"""Offline shard tooling: sources, the writer, the index and set format, verification and the
``simclr-shards`` command line."""
