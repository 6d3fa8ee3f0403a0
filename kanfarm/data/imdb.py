"""IMDB sentiment (aclImdb_v1.tar.gz) as a bag of words over the ``vocab_size`` most frequent
training words.

Reviews: ``aclImdb/{train,test}/{neg,pos}/*.txt`` (label neg = 0, pos = 1; the unlabelled
``train/unsup`` reviews are skipped), 25,000 train / 25,000 test, ordered by split, label, file name;
each split must hold reviews of both labels.
Tokens: lowercase, ``<br />`` removed, runs of ASCII letters/digits (inner ASCII apostrophes kept:
"don't"); everything else is a separator, accented letters and curly apostrophes included
("amélie" gives "am" and "lie"). Vocabulary: the ``vocab_size`` tokens with the highest total count
in the *training* reviews, ties broken alphabetically; column j is the j-th most frequent word.
Features: binary presence scaled to the grid, +1 if the word occurs in the review, -1 otherwise.
When the training text has fewer distinct words than ``vocab_size``, the extra columns are all -1.
``vocab_size`` is at most ``MAX_VOCAB``: features are dense, 25,000 x ``vocab_size`` float32 per
split (0.5 GB at the default 5,000).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from kanfarm.data.archive import read_files
from kanfarm.data.errors import DatasetFormatError, OptionError

if TYPE_CHECKING:
    import torch

N_CLASSES = 2
FORMAT_VERSION = 1
DEFAULTS: dict[str, Any] = {"vocab_size": 5000}
ARCHIVE = "aclImdb_v1.tar.gz"
LABELS = {"neg": 0, "pos": 1}
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
#: a labelled review's member name; not macOS's AppleDouble companion "._name.txt" (an archive re-tarred there)
_REVIEW = re.compile(r"aclImdb/(train|test)/(neg|pos)/((?!\._)[^/]*\.txt)")
#: bounds on what the archive may declare: the real reviews are at most ~14 KB, ~65 MB together
MAX_REVIEW_BYTES = 1 << 20
MAX_REVIEWS_BYTES = 256 << 20
#: the labelled reviews of the real archive (12,500 per label and split): each one is a row of
#: ``vocab_size`` features, an empty one a few bytes of archive
MAX_REVIEWS = 50_000


#: the largest ``vocab_size``: 2 x 25,000 x 200,000 float32 features are 40 GB already
MAX_VOCAB = 200_000


def n_features(options: dict[str, Any]) -> int:
    return int(options["vocab_size"])


def check_options(options: dict[str, Any]) -> None:
    """Refuse a vocabulary no machine could hold before any review is read (at submission)."""
    if int(options["vocab_size"]) > MAX_VOCAB:
        raise OptionError("vocab_size", f"dataset 'imdb': vocab_size {options['vocab_size']:,} is more than "
                                        f"{MAX_VOCAB:,} (dense features: 25,000 x vocab_size floats per split)")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(_BREAK.sub(" ", text.lower()))


def build_vocabulary(texts: Iterable[str], size: int) -> list[str]:
    """The ``size`` most frequent tokens of ``texts`` (total count), most frequent first."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(tokenize(text))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:size]]


def presence_features(texts: list[str], vocabulary: list[str], size: int) -> np.ndarray:
    """(n, size) float32 matrix: +1 where the vocabulary word occurs in the text, -1 elsewhere."""
    index = {word: j for j, word in enumerate(vocabulary)}
    x = np.full((len(texts), size), -1.0, dtype=np.float32)
    for i, text in enumerate(texts):
        columns = [index[t] for t in set(tokenize(text)) if t in index]
        x[i, columns] = 1.0
    return x


def read_reviews(path: Path) -> dict[str, list[tuple[str, int, str]]]:
    """split -> sorted (file name, label, text) of the labelled reviews in the archive."""
    reviews: dict[str, list[tuple[str, int, str]]] = {"train": [], "test": []}
    for member, blob in read_files(path, _REVIEW.fullmatch, max_member_bytes=MAX_REVIEW_BYTES,
                                   max_total_bytes=MAX_REVIEWS_BYTES, max_members=MAX_REVIEWS).items():
        split, label, name = _REVIEW.fullmatch(member).groups()
        reviews[split].append((name, LABELS[label], blob.decode("utf-8", errors="replace")))
    for split, items in reviews.items():
        for label, value in LABELS.items():  # 12,500 each in the real archive; the test archives are smaller
            if not any(item[1] == value for item in items):
                raise DatasetFormatError(f"{path}: no reviews under aclImdb/{split}/{label}")
        items.sort(key=lambda item: (item[1], item[0]))
    return reviews


def build(folder: Path, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    import torch  # here, not above: asking a dataset's shape imports no torch

    size = int(options["vocab_size"])
    reviews = read_reviews(folder / ARCHIVE)
    vocabulary = build_vocabulary((text for _, _, text in reviews["train"]), size)
    out: dict[str, torch.Tensor] = {}
    for split, items in reviews.items():
        out[f"x_{split}"] = torch.from_numpy(presence_features([t for _, _, t in items], vocabulary, size))
        out[f"y_{split}"] = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    return out
