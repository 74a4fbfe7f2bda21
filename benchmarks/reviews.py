"""The embedded Rotten Tomatoes snippets as a benchmark sample (no cleaning beyond de-duplication)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

RAW_REVIEWS = (
    Path(__file__).resolve().parents[1] / "data" / "01_raw" / "rotten_tomatoes_corpus_full.csv.bz2"
)


def load_reviews(limit: int, seed: int) -> pd.DataFrame:
    """``limit`` shuffled fresh/rotten snippets (``text``, ``label``: 1 = fresh), order from ``seed``."""
    frame = pd.read_csv(RAW_REVIEWS)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    frame = frame.drop_duplicates(subset="text")
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    frame["label"] = (frame["category"] == "fresh").astype(int)
    return frame.iloc[:limit][["text", "label"]]
