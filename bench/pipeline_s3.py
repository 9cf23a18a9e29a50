"""`bench.py pipeline --bucket s3://BUCKET/PREFIX/`: images/s of the training loader on the same shards read from
local disk and streamed from object storage (``pipeline.remote``), interleaved in one run, with and without a
remote store's per-request latency (``--delays_ms``: a delaying proxy on 127.0.0.1, ``bench.s3_local``).

``--seaweedfs`` starts a SeaweedFS server on 127.0.0.1 (throwaway credentials) and uploads each preset's shards to
``BUCKET/PREFIX/<preset>/``; without it the standard AWS environment names the store, and the shards are uploaded
there unless the prefix already holds them.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from .common import write_result


def _conditions(delays_ms: list[int], endpoint: str) -> list[tuple[str, float, str | None]]:
    """(name, delay in s, endpoint) per streamed condition; the proxies are made by ``_proxies``."""
    return [(f"s3_delay_{d}ms" if d else "s3", d / 1000, endpoint) for d in delays_ms]


def _preset_url(bucket: str, name: str) -> str:
    return bucket.rstrip("/") + f"/{name}/"


def _upload(shards: Path, url: str) -> None:
    from ..pipeline.shards import s3

    bucket, prefix = s3.split_url(url)
    s3.ensure_bucket(bucket)
    present = s3.list_objects(bucket, prefix)
    local = [p for p in Path(shards).iterdir() if p.is_file()]
    if len(present) != len(local) or any(
        present.get(prefix + p.name) != p.stat().st_size for p in local
    ):
        print(f"uploading {shards} to {url}")
        s3.upload_set(shards, url)


def _use_endpoint(endpoint: str) -> None:
    from ..pipeline.shards import s3

    os.environ["AWS_ENDPOINT_URL"] = endpoint
    s3.client.cache_clear()


def compare_s3(name: str, shards: Path, preset: dict, args, endpoints: dict[str, str], run) -> dict:
    """One interleaved run: local disk, then the bucket through each endpoint (direct, each delay); ``run``:
    ``bench.pipeline.run``, passed in (this module is its helper, not its importer)."""

    url = _preset_url(args.bucket, name)
    local = run(shards, preset, "dali", args.cores, args.device, args.seconds)
    print(f"[{name}] local disk:        {local['images_per_s']:8.1f} images/s")
    row = {"local": local}
    for condition, endpoint in endpoints.items():
        _use_endpoint(endpoint)
        streamed = run(url, preset, "dali", args.cores, args.device, args.seconds)
        ratio = round(streamed["images_per_s"] / local["images_per_s"], 3)
        print(
            f"[{name}] {condition:18s} {streamed['images_per_s']:8.1f} images/s ({ratio:.2f}x local)"
        )
        row[condition] = {**streamed, "ratio_to_local": ratio}
    return row


def main_s3(args, presets: dict, shards_for, run) -> dict:
    """``bench.py pipeline --bucket``: every preset, ``args.runs`` interleaved runs; writes the JSON result."""
    from .s3_local import DelayProxy, SeaweedServer, apply_env

    server = SeaweedServer().start() if args.seaweedfs else None
    if server is not None:
        apply_env(server.env())
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint is None and any(args.delays_ms):
        raise SystemExit(
            "error: --delays_ms needs AWS_ENDPOINT_URL (or --seaweedfs): the proxy forwards to it"
        )
    proxies = {d: DelayProxy(endpoint, d / 1000) for d in args.delays_ms if d}
    endpoints = {
        (f"s3_delay_{d}ms" if d else "s3"): (proxies[d].endpoint if d else endpoint)
        for d in args.delays_ms
    }
    results = {}
    try:
        for name, preset in presets.items():
            shards, description = shards_for(name)
            _use_endpoint(endpoint)
            _upload(shards, _preset_url(args.bucket, name))
            runs = [
                compare_s3(name, shards, preset, args, endpoints, run) for _ in range(args.runs)
            ]
            ratios = {c: [r[c]["ratio_to_local"] for r in runs] for c in endpoints}
            results[name] = {
                "data": description,
                "bucket": _preset_url(args.bucket, name),
                "store": "SeaweedFS on 127.0.0.1 (bench.s3_local)"
                if server
                else "AWS_ENDPOINT_URL's store",
                "image_size": preset["size"],
                "batch_size": preset["batch_size"],
                "dali_threads": args.cores,
                "runs": runs,
                "ratio_to_local": {
                    c: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                    for c, v in ratios.items()
                },
            }
            for c, v in ratios.items():
                print(f"[{name}] {c} / local over {len(v)} runs: {min(v):.2f}x .. {max(v):.2f}x")
    finally:
        for proxy in proxies.values():
            proxy.close()
        if server is not None:
            server.close()
    payload = {
        "device": args.device,
        "seconds_per_measurement": args.seconds,
        "delays_ms": args.delays_ms,
    }
    path = write_result("pipeline_s3", {**payload, "results": results}, args.json)
    print(f"wrote {path}")
    return results
