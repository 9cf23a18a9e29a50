"""The commands on sets in object storage, against SeaweedFS on 127.0.0.1: ``simclr-shards write|index|verify``
with ``s3://`` locations, a training run from a bucket (no credential string in anything it writes or prints), and
a store that goes away mid-run (a checkpoint of the last good step, a clear error, exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, tiny
from test_s3 import boto

from simclr_dali.pipeline.shards import s3
from simclr_dali.pipeline.shards.cli import main as shards_main

TINY = tiny(epochs=40)


@pytest.fixture
def written(s3_env, tmp_path, monkeypatch):
    """A synthetic labelled set written straight to a bucket by ``simclr-shards write``."""
    monkeypatch.setenv("SIMCLR_SHARDS_STAGING", str(tmp_path / "staging"))
    url = f"s3://simclr-cmd/{tmp_path.name}/"
    args = [
        "write",
        "synthetic",
        url + "train-%06d.tar",
        "--num_classes",
        "4",
        "--per_class",
        "20",
        "--quiet",
    ]
    assert shards_main([*args, "--max_count", "10"]) == 0
    return url


def test_write_puts_every_shard_index_and_record_in_the_bucket(written, s3_env, capsys):
    bucket, prefix = s3.split_url(written)
    names = sorted(key[len(prefix) :] for key in s3.list_objects(bucket, prefix))
    assert names == sorted(
        [f"train-{i:06d}.{ext}" for i in range(8) for ext in ("tar", "idx")]
        + ["classes.json", "shardset.json"]
    )
    assert shards_main(["write", "synthetic", written + "train-%06d.tar", "--num_classes", "4", "--per_class", "20",
                        "--quiet", "--max_count", "10"]) == 0  # fmt: skip
    assert (
        "uploaded 0 of 18 file(s)" in capsys.readouterr().out
    )  # a rerun finds everything there: nothing sent
    assert shards_main(["verify", written, "--quiet"]) == 0
    assert "verified 80 samples in 8 shard(s): 0 problem(s)" in capsys.readouterr().out


WRITE = [
    "write",
    "synthetic",
    "--num_classes",
    "4",
    "--per_class",
    "20",
    "--quiet",
    "--max_count",
    "10",
]


def test_write_ships_shard_by_shard_and_resumes_an_interrupted_write(
    s3_env, tmp_path, monkeypatch, capsys
):
    """Local space: staging never holds more than the shard being shipped (bounded, not the set); a write that
    dies after 3 shards went up resumes after them, sending nothing twice, and the set verifies."""
    from simclr_dali.pipeline.shards import s3_cli

    monkeypatch.setenv("SIMCLR_SHARDS_STAGING", str(tmp_path / "staging"))
    url = f"s3://simclr-cmd/ship-{tmp_path.name}/"
    staging = s3_cli.staging_directory(url + "train-%06d.tar")
    held, shipped, ship = [], [], s3_cli.ShardShipper.ship

    def counting(self, tar):
        held.append(len(list(staging.glob("*.tar"))))
        if len(shipped) == 3 and fail:
            raise s3.ObjectStoreError("the store went away (simulated)")
        ship(self, tar)
        shipped.append(tar.name)

    monkeypatch.setattr(s3_cli.ShardShipper, "ship", counting)
    fail = True
    assert shards_main([WRITE[0], WRITE[1], url + "train-%06d.tar", *WRITE[2:]]) == 2
    bucket, prefix = s3.split_url(url)
    assert sorted(k[len(prefix) :] for k in s3.list_objects(bucket, prefix)) == [
        f"train-{i:06d}.{ext}" for i in range(3) for ext in ("idx", "tar")
    ]
    assert max(held) == 1  # the first run: only the shard being shipped
    fail, held = False, []
    capsys.readouterr()
    assert shards_main([WRITE[0], WRITE[1], url + "train-%06d.tar", *WRITE[2:]]) == 0
    out = capsys.readouterr().out
    # shard 3 was in the journal, not yet shipped, when the write died: kept here, sent with the records at the end
    assert "4 kept from an interrupted write" in out and "uploaded 12 of 12 file(s)" in out, out
    assert shipped == [f"train-{i:06d}.tar" for i in (0, 1, 2, 4, 5, 6, 7)]  # nothing shipped twice
    assert max(held) == 2 and not staging.exists()  # shard 3 waiting + the one being shipped
    assert shards_main(["verify", url, "--quiet"]) == 0
    assert "verified 80 samples in 8 shard(s): 0 problem(s)" in capsys.readouterr().out


def test_index_rebuilds_a_missing_index_in_the_bucket(written, s3_env, capsys):
    bucket, prefix = s3.split_url(written)
    boto(s3_env).delete_object(Bucket=bucket, Key=prefix + "train-000002.idx")
    assert shards_main(["verify", written, "--quiet"]) == 2
    assert "train-000002.tar has no index" in capsys.readouterr().err
    assert shards_main(["index", written, "--quiet"]) == 0
    assert shards_main(["verify", written, "--quiet"]) == 0


def test_verify_names_a_damaged_shard_by_its_url(written, s3_env, capsys):
    bucket, prefix = s3.split_url(written)
    client = boto(s3_env)
    data = bytearray(
        client.get_object(Bucket=bucket, Key=prefix + "train-000001.tar")["Body"].read()
    )
    data[1024:1400] = b"\0" * 376  # inside the first sample's image
    client.put_object(Bucket=bucket, Key=prefix + "train-000001.tar", Body=bytes(data))
    assert shards_main(["verify", written, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{written}train-000001.tar" in out and "1 problem" in out


def train_command(tmp_path, url, **overrides) -> list[str]:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {**TINY, "train_shards": url, "output_dir": str(tmp_path / "run"), **overrides}
        )
    )
    return [sys.executable, "train.py", "--config", str(config)]


def test_training_from_a_bucket_writes_no_credential(written, s3_env, tmp_path):
    """Training and its in-training evaluations (kNN + linear on eval shards in the bucket) from s3://; nothing
    the run writes or prints holds a credential."""
    env = {**os.environ, **s3_env.env()}
    evaluations = dict(eval_every_epochs=1, eval_train_shards=written, eval_val_shards=written)
    command = train_command(tmp_path, written, max_steps=6, **evaluations)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "eval @ epoch 1.00: knn_top1" in log and "linear_top1" in log, log[-2000:]
    secrets = [s3_env.secret_key, s3_env.access_key]
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".safetensors") for p in files) and any(
        p.suffix == ".json" for p in files
    )
    for text in [result.stdout, result.stderr] + [p.read_bytes().decode("latin-1") for p in files]:
        assert not any(secret in text for secret in secrets)


def take_away(how: str, server, url: str) -> None:
    """The store goes away mid-run: the server stopped, or every shard of the set deleted."""
    if how == "server stopped":
        server.stop()
        return
    bucket, prefix = s3.split_url(url)
    client = boto(server)
    for key in [k for k in s3.list_objects(bucket, prefix) if k.endswith(".tar")]:
        client.delete_object(Bucket=bucket, Key=key)


@pytest.mark.parametrize(
    "how, cause", [("server stopped", "did not answer"), ("shards deleted", "no such object")]
)
def test_a_store_that_goes_away_mid_run_ends_with_a_checkpoint(
    written, s3_env, tmp_path, how, cause
):
    env = {**os.environ, **s3_env.env(), "SIMCLR_S3_RETRY_SECONDS": "3", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        train_command(tmp_path, written, max_steps=200, checkpoint_every=2),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log, deadline = tmp_path / "run" / "train.log", time.monotonic() + 300
    try:
        while (
            time.monotonic() < deadline and process.poll() is None
        ):  # two steps done: take the store away
            if log.exists() and " step 3:" in log.read_text():
                break
            time.sleep(0.2)
        take_away(how, s3_env, written)
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
        if how == "server stopped":
            s3_env.start()
    output = out
    assert process.returncode == 2, output[-3000:]
    assert "object store failure on rank 0" in output and cause in output, output[-3000:]
    assert written.split("/")[2] in output and "--resume auto" in output
    assert (
        "bad data" not in output and "rewrite" not in output
    )  # named as an outage, not as a damaged sample
    assert list((tmp_path / "run" / "checkpoints").glob("step_*")), output[-3000:]
    assert s3_env.secret_key not in output
