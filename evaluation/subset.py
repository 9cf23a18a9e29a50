"""Class-balanced label subsets for semi-supervised fine-tuning (the paper's 1% / 10% protocols).

A subset is chosen once, by key, with a seeded RNG, and can be written to / read from a JSON file so that
runs (and other people's runs) fine-tune on exactly the same images:

    {"label_fraction": 0.01, "seed": 0, "per_class": 13, "num_samples": 13000, "shards": ["train-000000.tar", ...],
     "classes": {"0": ["n01440764/n01440764_10026%2EJPEG", ...], "1": [...], ...}}

"Class-balanced" as in the paper (Chen et al. 2020, §B.5: "sampled in a class-balanced way, ~12.8 images
per class" for 1% of ImageNet): every class gets the same number, ``label_fraction * N / C`` rounded (half up).

A subset can also be *listed*: the official SimCLR 1% / 10% ImageNet files (one image file name per line,
``n01440764_10026.JPEG``) or any such text file select the samples whose stored source path (the ``.json``
member the shard writer keeps) ends in that name; a line with a '/' must match the whole relative path.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.errors import SimclrError
from ..pipeline.shards.location import read_classes, read_labels, read_source_paths, set_shards


class SubsetError(SimclrError, ValueError):
    """The subset cannot be chosen or read as asked; the message names the class or file at fault."""


@dataclass
class LabelSubset:
    """Sample keys per class (label -> sorted keys) and how they were chosen."""

    keys_per_class: dict[int, list[str]]
    label_fraction: float
    seed: int
    per_class: int | None  # None for a listed subset (not balanced by construction)
    shards: list[str]
    list_file: str | None = None  # the text list it was read from, if any

    @property
    def keys(self) -> list[str]:
        return [key for label in sorted(self.keys_per_class) for key in self.keys_per_class[label]]

    @property
    def num_samples(self) -> int:
        return sum(len(keys) for keys in self.keys_per_class.values())

    def to_json(self) -> dict:
        return {
            "label_fraction": self.label_fraction,
            "seed": self.seed,
            "per_class": self.per_class,
            "num_samples": self.num_samples,
            "shards": self.shards,
            **({"list_file": self.list_file} if self.list_file else {}),
            "classes": {str(label): keys for label, keys in sorted(self.keys_per_class.items())},
        }

    @classmethod
    def from_json(cls, data: dict) -> LabelSubset:
        per_class = data.get("per_class", 0)
        keys_per_class = {
            int(label): [str(k) for k in keys] for label, keys in data["classes"].items()
        }
        return cls(
            keys_per_class,
            float(data.get("label_fraction", 0.0)),
            int(data.get("seed", -1)),
            None if per_class is None else int(per_class),
            list(data.get("shards", [])),
            data.get("list_file"),
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> LabelSubset:
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            hint = (
                "; a text list of file names goes to --subset_list"
                if path.suffix.lower() != ".json"
                else ""
            )
            raise SubsetError(
                f"subset file {path} is not a subset written by evaluate.py ({type(error).__name__}: {error}){hint}"
            ) from None


def class_name(label: int, names: list[str] | None) -> str:
    return f"{label} ({names[label]!r})" if names and 0 <= label < len(names) else str(label)


def select_subset(
    labels: dict[str, int],
    label_fraction: float,
    seed: int,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    shards: list[str] | None = None,
) -> LabelSubset:
    """``label_fraction * N / C`` (rounded half up) keys of every class, drawn without replacement by
    ``numpy.random.default_rng(seed)`` from each class's sorted keys (so the draw depends on the keys and
    labels only, not on the shard order). Raises ``SubsetError`` naming the class that cannot supply them."""
    if not 0.0 < label_fraction <= 1.0:
        raise SubsetError(f"--label-fraction must be in (0, 1], got {label_fraction}")
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in labels.items():
        by_class[label].append(key)
    num_classes = num_classes or (max(by_class) + 1)
    requested = label_fraction * len(labels) / num_classes
    per_class = math.floor(requested + 0.5)  # round half up (Python's round() halves to even)
    if per_class < 1:
        smallest = min(range(num_classes), key=lambda c: len(by_class.get(c, [])))
        raise SubsetError(
            f"--label-fraction {label_fraction} of {len(labels)} samples over {num_classes} classes "
            f"is {requested:.2f} samples "
            f"per class: less than 1 (class {class_name(smallest, class_names)} would get none); use a larger fraction"
        )
    for label in range(num_classes):
        available = len(by_class.get(label, []))
        if available < per_class:
            raise SubsetError(
                f"class {class_name(label, class_names)} has {available} training samples; "
                f"--label-fraction {label_fraction} "
                f"needs {per_class} of every class (class-balanced)"
            )
    rng = np.random.default_rng(seed)
    chosen = {
        label: sorted(str(k) for k in rng.choice(sorted(by_class[label]), per_class, replace=False))
        for label in range(num_classes)
    }
    return LabelSubset(chosen, label_fraction, seed, per_class, shards or [])


def check_subset(
    subset: LabelSubset, labels: dict[str, int], source: str, class_names: list[str] | None = None
) -> None:
    """Every key of ``subset`` exists in ``labels`` with the class the subset files it under."""
    for label, keys in subset.keys_per_class.items():
        for key in keys:
            if key not in labels:
                raise SubsetError(
                    f"subset file {source}: key {key} (class {class_name(label, class_names)}) is "
                    "not in the training shards"
                )
            if labels[key] != label:
                raise SubsetError(
                    f"subset file {source}: key {key} is filed under class {label} but its label is {labels[key]}"
                )
        if not keys:
            raise SubsetError(
                f"subset file {source}: class {class_name(label, class_names)} has no samples"
            )


def read_name_list(path: str | Path) -> list[str]:
    """File names (or relative paths) of a subset list, one per line; blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise SubsetError(f"subset list {path} does not exist")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise SubsetError(f"subset list {path} cannot be read as text ({error})") from None
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise SubsetError(f"subset list {path} names no files")
    return list(dict.fromkeys(names))  # a repeated line selects the same sample once


def listed_subset(
    names: list[str], paths: dict[str, str], labels: dict[str, int], source: str, shards: list[str]
) -> LabelSubset:
    """The samples named by ``names`` (file names, or relative paths when they hold a '/') among ``paths``
    (key -> stored source path), filed by their labels. ``SubsetError`` names listed files that no sample
    has, and file names that several samples share."""
    by_path = {path: key for key, path in paths.items()}
    by_name: dict[str, list[str]] = defaultdict(list)
    for key, path in paths.items():
        by_name[path.rsplit("/", 1)[-1]].append(key)
    chosen, missing, ambiguous = [], [], []
    for name in names:
        if "/" in name:
            key = by_path.get(name.lstrip("/"))
            (chosen.append(key) if key else missing.append(name))
        elif len(by_name.get(name, [])) == 1:
            chosen.append(by_name[name][0])
        else:
            (ambiguous if name in by_name else missing).append(name)
    if missing:
        raise SubsetError(
            f"subset list {source}: {len(missing)} of its {len(names)} files are not in the training "
            f"shards (matched by the samples' stored source paths), e.g. {missing[:10]}"
        )
    if ambiguous:
        raise SubsetError(
            f"subset list {source}: file name(s) {ambiguous[:10]} match several samples (same name in "
            "different folders): list them with their folder, e.g. CLASS/NAME"
        )
    keys_per_class: dict[int, list[str]] = defaultdict(list)
    for key in chosen:
        if key not in labels:
            raise SubsetError(f"subset list {source}: sample {key} ({paths[key]}) has no label")
        keys_per_class[labels[key]].append(key)
    chosen_per_class = {label: sorted(keys) for label, keys in sorted(keys_per_class.items())}
    return LabelSubset(chosen_per_class, len(chosen) / len(labels), -1, None, shards, str(source))


def subset_for(
    train_shards,
    label_fraction: float,
    seed: int,
    subset_file: str | None = None,
    num_classes: int | None = None,
    subset_list: str | None = None,
) -> tuple[LabelSubset, str]:
    """The fine-tuning subset, and how it was obtained ('listed' | 'loaded' | 'selected'):
    - ``subset_list`` (or a ``subset_file`` ending in ``.txt``): the samples it names (``listed_subset``);
      a list that does not exist is an error;
    - ``subset_file`` that exists: read (and checked against the shards);
    - else chosen with ``select_subset`` (and written to ``subset_file`` if given)."""
    if subset_list and subset_file:
        raise SubsetError(
            "give --subset_list (a text list of file names) or --subset_file (a JSON of keys), not both"
        )
    list_file = subset_list or (
        subset_file if subset_file and Path(subset_file).suffix.lower() == ".txt" else None
    )
    paths = set_shards(train_shards)
    if list_file:
        names = read_name_list(list_file)
        subset = listed_subset(
            names, read_source_paths(paths), read_labels(paths), list_file, [p.name for p in paths]
        )
        return subset, "listed"
    labels = read_labels(paths)
    names = read_classes(paths)
    if subset_file and Path(subset_file).is_file():
        subset = LabelSubset.load(subset_file)
        check_subset(subset, labels, subset_file, names)
        return subset, "loaded"
    subset = select_subset(
        labels,
        label_fraction,
        seed,
        num_classes or (len(names) if names else None),
        names,
        [p.name for p in paths],
    )
    if subset_file:
        subset.save(subset_file)
    return subset, "selected"
