"""Training batches: a shuffled order that depends only on (seed, epoch), and no last batch of one image
(BatchNorm in training mode needs two values per channel)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, Sampler

log = logging.getLogger(__name__)


class EpochShuffle(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch).

    Lightning calls ``set_epoch`` before each epoch, so a run resumed from a
    checkpoint sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def note_single_image_left_out(owner: object) -> None:
    """Log once per ``owner`` (a batch sampler) that its last batch of one image is left out."""
    if not getattr(owner, "noted_single", False):
        owner.noted_single = True  # type: ignore[attr-defined]
        log.info(
            "the last training batch holds one image: it is left out of every epoch (BatchNorm needs two "
            "values per channel); evaluation keeps every image"
        )


def without_single_image_batch(batches: Iterator[list[int]], batch_size: int, owner: object) -> Iterator[list[int]]:
    """Training batches, less a last batch of one image (a remainder; ``batch_size`` 1 keeps every batch):
    BatchNorm in training mode needs two values per channel, and a BN1d head would stop the run."""
    for batch in batches:
        if len(batch) > 1 or batch_size == 1:
            yield batch
        else:
            note_single_image_left_out(owner)


def training_batch_count(images: int, batch_size: int, owner: object) -> int:
    """Batches per epoch under :func:`without_single_image_batch`. Lightning asks before the epoch and stops
    after that many batches: the note is logged here."""
    if batch_size > 1 and images % batch_size == 1:
        note_single_image_left_out(owner)
    return images if batch_size == 1 else images // batch_size + (images % batch_size > 1)


class TrainingBatches(BatchSampler):
    """``BatchSampler`` of the training loader: a last batch of one image is left out
    (:func:`without_single_image_batch`). Lightning rebuilds it around a distributed sampler
    (same arguments), so each process leaves out its own."""

    def __iter__(self):
        return without_single_image_batch(super().__iter__(), self.batch_size, self)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else training_batch_count(n, self.batch_size, self)
