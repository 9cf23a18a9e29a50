"""Shards in object storage, against a real S3 server (SeaweedFS on 127.0.0.1, started and stopped here): the stream
sees the same samples as local shards, resumes exactly, stays within its memory bound, and every fault ends in a
successful retry or a clear error naming bucket and key, never a credential."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import make_shards

from simclr_dali.pipeline import remote
from simclr_dali.pipeline.augment import AugmentConfig
from simclr_dali.pipeline.loader import AugmentedView, DaliLoader, EvalView, classifier_augment
from simclr_dali.pipeline.shards import s3
from simclr_dali.pipeline.shards.s3 import ObjectPath, ObjectStoreError

CIFAR = AugmentConfig.cifar()


@pytest.fixture(scope="session")
def id_shards(tmp_path_factory):
    """96 samples whose labels are their ids (96 classes), 10 per shard: 10 shards."""
    directory, labels = make_shards(
        tmp_path_factory.mktemp("ids"), 96, num_classes=96, per_shard=10
    )
    return directory


_uploaded: set[str] = set()


def uploaded(server, directory, name: str) -> str:
    from simclr_dali.bench.s3_local import upload_directory

    url = f"s3://simclr-test/{name}/"
    if url not in _uploaded:
        upload_directory(directory, url, server.env())
        _uploaded.add(url)
    return url


def boto(server):
    import boto3

    env = server.env()
    return boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )


def epoch_ids(loader, epochs: int) -> list[list[int]]:
    return [[i for _, labels in loader for i in labels.tolist()] for _ in range(epochs)]


def train_loader(location, **kw):
    view = AugmentedView(classifier_augment(16))
    return DaliLoader(location, 8, view, train=True, seed=5, pipelines=2, shuffle_buffer=16, **kw)


# ------------------------------------------------------------------ the same samples as local shards


def test_training_from_s3_sees_the_same_keys_per_epoch_as_local(s3_env, id_shards):
    url = uploaded(s3_env, id_shards, "ids")
    local, streamed = epoch_ids(train_loader(id_shards), 3), epoch_ids(train_loader(url), 3)
    for here, there in zip(local, streamed):
        assert len(there) == len(set(there)) == 96  # every sample once per epoch, no padding
        assert sorted(here) == sorted(there)
    assert streamed[0] != streamed[1]  # reshuffled every epoch


@pytest.mark.slow
def test_two_gloo_ranks_from_s3_see_disjoint_parts_and_the_local_keys(s3_env, id_shards, tmp_path):
    """torchrun, 2 gloo processes: per epoch, the ranks' samples from the bucket are disjoint, equal in number,
    and together exactly the samples the same 2-rank run reads from local shards."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    url, out = uploaded(s3_env, id_shards, "ids"), tmp_path / "keys.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    command += [str(ROOT / "tests" / "s3_rank_keys.py"), str(id_shards), url, str(out)]
    env = {**os.environ, **s3_env.env(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ranks = json.loads(out.read_text())
    for epoch in range(2):
        local = [ids for rank in ranks for ids in rank["local"][epoch]]
        parts = [rank["s3"][epoch] for rank in ranks]
        assert len(parts[0]) == len(parts[1]) == 48 and not set(parts[0]) & set(
            parts[1]
        )  # disjoint, equal steps
        assert sorted(parts[0] + parts[1]) == sorted(local) == list(range(96))
    assert ranks[0]["s3"][0] != ranks[0]["s3"][1]  # reshuffled every epoch


def test_evaluation_from_s3_reads_the_local_order(s3_env, id_shards):
    url = uploaded(s3_env, id_shards, "ids")
    make = lambda where, rank: DaliLoader(
        where, 7, EvalView(16, 16), train=False, shard_id=rank, num_shards=2
    )
    for rank in range(2):
        local, streamed = make(id_shards, rank), make(url, rank)
        assert epoch_ids(local, 1) == epoch_ids(streamed, 1) and len(streamed) == len(local)


@pytest.mark.parametrize(
    "stop", [1, 5, 12]
)  # after the first batch, mid-epoch, the epoch's last batch (12)
def test_resume_from_s3_sees_every_sample_of_the_epoch_once(s3_env, id_shards, stop):
    url = uploaded(s3_env, id_shards, "ids")
    reference = epoch_ids(train_loader(url), 2)
    loader = train_loader(url)
    seen = []
    for _, labels in loader:
        seen += labels.tolist()
        if len(seen) == stop * 8:
            state = loader.state_dict()
            break
    restored = train_loader(url)
    restored.load_state_dict(state)
    assert len(train_loader(url)) == 12
    while len(seen) < 2 * 96:
        seen += [i for _, labels in restored for i in labels.tolist()]
    assert seen == reference[0] + reference[1]  # the uninterrupted run's samples, in its order


# ------------------------------------------------------------------ bounded memory


def test_streaming_stays_within_the_cache_bound(s3_env, id_shards, monkeypatch):
    url = uploaded(s3_env, id_shards, "ids")
    sizes = [p.stat().st_size for p in sorted(id_shards.glob("*.tar"))]
    bound = 2 * (max(sizes) + 1)  # per pipeline: two shards of the ten in the set
    made = []
    original = remote.ShardPrefetcher.__init__

    def recording(self, *args, **kw):
        original(self, *args, **kw)
        made.append(self)

    monkeypatch.setattr(remote.ShardPrefetcher, "__init__", recording)
    ids = epoch_ids(train_loader(url, cache_bytes=2 * bound, in_flight=3), 2)
    assert all(sorted(epoch) == list(range(96)) for epoch in ids)
    assert made and sum(len(p.plan) for p in made) >= 20  # every shard fetched each epoch
    assert max(p.peak_bytes for p in made) <= bound < sum(sizes)


def test_a_shard_larger_than_the_cache_is_a_clear_error(s3_env, id_shards):
    url = uploaded(s3_env, id_shards, "ids")
    with pytest.raises(ObjectStoreError, match=r"larger than the shard cache .*cache_bytes"):
        epoch_ids(train_loader(url, cache_bytes=1000), 1)


# ------------------------------------------------------------------ faults


def test_wrong_credentials_named_without_the_secret(s3_env, id_shards, monkeypatch):
    url = uploaded(s3_env, id_shards, "ids")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    s3.client.cache_clear()
    with pytest.raises(ObjectStoreError) as error:
        train_loader(url)
    message = str(error.value)
    assert (
        "simclr-test" in message and "credentials" in message and "AWS_SECRET_ACCESS_KEY" in message
    )
    assert "wrong-secret-0123456789" not in message and s3_env.access_key not in message


@pytest.mark.parametrize(
    "location, expected",
    [
        ("s3://no-such-bucket-xyz/ids/", r"bucket 'no-such-bucket-xyz' does not exist"),
        (
            "s3://simclr-test/no-such-prefix/",
            r"no \*\.tar shards under s3://simclr-test/no-such-prefix/",
        ),
        ("s3://Bad_Bucket/x/", r"not an object location"),
    ],
)
def test_missing_bucket_or_prefix_named(s3_env, id_shards, location, expected):
    uploaded(s3_env, id_shards, "ids")
    with pytest.raises(ObjectStoreError, match=expected):
        train_loader(location)


def test_missing_index_named(s3_env, id_shards):
    url = uploaded(s3_env, id_shards, "noidx")
    boto(s3_env).delete_object(Bucket="simclr-test", Key="noidx/part-000003.idx")
    with pytest.raises(
        ObjectStoreError,
        match=r"s3://simclr-test/noidx/part-000003.tar has no index .*simclr-shards",
    ):
        train_loader(url)


def test_object_deleted_mid_epoch_named(s3_env, id_shards):
    url = uploaded(s3_env, id_shards, "deleted")
    one_shard = max(p.stat().st_size for p in id_shards.glob("*.tar"))
    loader = train_loader(
        url, in_flight=1, cache_bytes=2 * one_shard
    )  # one shard ahead per pipeline
    batches = iter(loader)
    next(batches)
    client = boto(s3_env)
    for i in range(10):
        client.delete_object(Bucket="simclr-test", Key=f"deleted/part-{i:06d}.tar")
    _uploaded.discard(url)
    with pytest.raises(
        ObjectStoreError, match=r"reading s3://simclr-test/deleted/part-\d{6}\.tar: no such object"
    ):
        for _ in batches:
            pass


def test_server_restarted_mid_epoch_is_retried(s3_env, id_shards):
    url = uploaded(s3_env, id_shards, "ids")
    loader = train_loader(url, in_flight=1)
    batches = iter(loader)
    ids = next(batches)[1].tolist()
    s3_env.stop()
    restarter = threading.Timer(2.0, s3_env.start)
    restarter.start()
    started = time.monotonic()
    ids += [i for _, labels in batches for i in labels.tolist()]
    restarter.join()
    assert sorted(ids) == list(range(96)) and time.monotonic() - started >= 1.0


def test_server_that_does_not_come_back_is_a_clear_error(s3_env, id_shards, monkeypatch):
    url = uploaded(s3_env, id_shards, "ids")
    monkeypatch.setattr(
        s3, "RETRY_SECONDS", 2.0
    )  # before the loader: its fetch threads start at once
    loader = train_loader(url, in_flight=1)
    s3_env.stop()
    try:
        with pytest.raises(
            ObjectStoreError, match=r"did not answer .* within 2 s of retries; check that it is up"
        ):
            epoch_ids(loader, 1)
    finally:
        s3_env.start()


def test_throttling_is_retried(s3_env, id_shards, monkeypatch):
    from simclr_dali.bench.s3_local import DelayProxy

    url = uploaded(s3_env, id_shards, "ids")
    proxy = DelayProxy(s3_env.endpoint, delay=0.02)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3.client.cache_clear()
        proxy.fail_next(4)  # the listing and the first index reads answer 503 SlowDown
        loader = train_loader(url)
        assert sorted(epoch_ids(loader, 1)[0]) == list(range(96))
        assert proxy.requests >= 4 + 10 + 10  # the failed ones, then indexes and shards
    finally:
        proxy.close()


def test_prefetcher_bound_holds_for_any_plan():
    """A property over many plans: the bytes held never exceed the bound, every shard arrives intact, in order."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        sizes = rng.integers(1, 100, rng.integers(1, 30)).tolist()
        bound = int(rng.integers(max(sizes), 3 * max(sizes) + 1))
        data = {
            ObjectPath(f"s3://b-x/k{i}.tar"): bytes([i % 256]) * size
            for i, size in enumerate(sizes)
        }

        def fetch(url, data=data):
            time.sleep(rng.random() * 0.001)
            return data[url]

        prefetcher = remote.ShardPrefetcher(
            list((u, len(d)) for u, d in data.items()), bound, 3, fetch
        )
        for i, payload in enumerate(data.values()):
            assert prefetcher.take(i) == payload
            prefetcher.release(i)
        assert prefetcher.peak_bytes <= bound and prefetcher.held == 0
        prefetcher.close()


def test_buffer_shuffle_is_a_permutation():
    for n, buffer in [(0, 4), (1, 1), (10, 1), (10, 3), (100, 1000)]:
        order = remote.buffer_shuffle(n, buffer, np.random.default_rng(n))
        assert sorted(order.tolist()) == list(range(n))
    assert remote.buffer_shuffle(50, 1, np.random.default_rng(0)).tolist() == list(
        range(50)
    )  # no buffer, no shuffle
