"""Evaluation from a bucket, against SeaweedFS on 127.0.0.1: evaluate.py on ``s3://`` shards gives the numbers it
gives on the same local shards, and what evaluation reads beside the images (classes, labels, source paths, the
fine-tuning subset) comes out of a bucket as out of a directory (``pipeline.shards.location``)."""

from __future__ import annotations

import json

import pytest
from test_evaluate import data, exported, run_main  # noqa: F401  (module fixtures)
from test_s3 import boto, uploaded

from simclr_dali.evaluation.subset import subset_for
from simclr_dali.pipeline.shards import location


@pytest.fixture
def buckets(s3_env, data):  # noqa: F811
    return uploaded(s3_env, data[0], "eval-train"), uploaded(s3_env, data[1], "eval-val")


def metrics(capsys, tmp_path, name, train, val, exported):  # noqa: F811
    report = tmp_path / f"{name}.json"
    args = [
        "--checkpoint",
        exported,
        "--protocol",
        "knn,linear",
        "--epochs",
        5,
        "--seed",
        3,
        "--json",
        report,
    ]
    status, output = run_main(
        [*args, "--train_shards", train, "--val_shards", val, "--local_batch_size", 16], capsys
    )
    assert status == 0, output
    return json.loads(report.read_text())


def test_evaluate_from_s3_gives_the_local_numbers(buckets, data, exported, tmp_path, capsys):  # noqa: F811
    local = metrics(capsys, tmp_path, "local", data[0], data[1], exported)
    remote = metrics(capsys, tmp_path, "s3", *buckets, exported)
    assert remote["results"][0]["metrics"] == local["results"][0]["metrics"]
    for field in ("num_train", "num_val", "num_classes"):
        assert remote["data"][field] == local["data"][field]
    assert local["data"]["num_classes"] == 4


def test_labels_classes_and_subsets_read_from_s3_as_from_local(buckets, data, s3_env):  # noqa: F811
    train_url = buckets[0]
    assert (
        location.read_labels(train_url) == location.read_labels(data[0])
        and len(location.read_labels(train_url)) == 100
    )
    assert location.read_source_paths(train_url) == location.read_source_paths(data[0])
    assert (
        location.read_classes(train_url)
        == location.read_classes(data[0])
        == ["disc", "square", "triangle", "ring"]
    )
    assert location.labelled(train_url) and location.count_classes(*buckets) == 4
    here, _ = subset_for(str(data[0]), 0.1, seed=7)
    there, _ = subset_for(train_url, 0.1, seed=7)
    assert there.keys_per_class == here.keys_per_class and there.shards == here.shards


def test_class_count_without_classes_json_reads_the_labels(s3_env, data):  # noqa: F811
    url = uploaded(s3_env, data[1], "eval-val-noclasses")
    boto(s3_env).delete_object(Bucket="simclr-test", Key="eval-val-noclasses/classes.json")
    assert location.read_classes(url) is None
    assert location.count_classes(url) == 1 + max(location.read_labels(data[1]).values()) == 4
