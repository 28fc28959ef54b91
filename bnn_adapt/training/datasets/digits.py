"""scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``): offline, no files, the demo's data."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bnn_adapt.training.datasets import HALF, DatasetSpec, LabelledSet

SPLIT_SEED = 0  # fixed, so every run sees the same held-out digits whatever its seed


def load(root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """The digits scaled to [0, 1] (floats, kept so by the tensor pipeline); a stratified 25% is held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, eval_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=digits.target, random_state=SPLIT_SEED
    )
    return tuple(  # type: ignore[return-value]
        (TensorDataset(images[idx], labels[idx]), labels[idx].tolist()) for idx in (train_idx, eval_idx)
    )


DATASET = DatasetSpec(
    "scikit-learn digits",
    load,
    tuple(str(d) for d in range(10)),
    HALF,
    HALF,
    large=False,
    embedded="scikit-learn's bundled digits (sklearn.datasets.load_digits)",
)
