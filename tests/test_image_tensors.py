"""Small-image datasets as tensors (issue #24 item 1): decoded once, augmented in batches.

What the thesis's per-image pipeline did is what the batches show: crop offsets uniform over
the padding, flips at rate 0.5 where the dataset has them (CIFAR) and never elsewhere,
normalisation to the configured statistics; evaluation tensors equal the per-image pipeline's
bit for bit and are never augmented; a resumed epoch sees the same batches; everything
pickles (``trainer=ddp`` is ``ddp_spawn``). Plus the last training batch of one image
(issue #23 item 4), left out of training and never out of evaluation.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from bnn_adapt.training.batches import TrainingBatches
from bnn_adapt.training.datamodule import ClassSplitDataModule
from bnn_adapt.training.image_tensors import BatchTransform, ImageTensors
from bnn_adapt.training.tap_cache import ViewBatches
from tests.helpers.data import write_cifar10, write_fashion_idx, write_imagefolder


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small_images")
    write_cifar10(root / "cifar10", n_per_class=16)
    write_fashion_idx(root / "fashion", n_per_class=6)
    write_imagefolder(root / "folder", classes=("cat", "dog", "3"), n_per_class=4, grayscale_some=True)
    return {"cifar10": root / "cifar10", "fashion_mnist": root / "fashion", "imagefolder": root / "folder"}


@pytest.fixture
def no_system_fashion(monkeypatch):
    from bnn_adapt.training.datasets import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ("/nonexistent/fashion-mnist",))


def make(name: str, roots, **kwargs) -> ClassSplitDataModule:
    classes = {
        "cifar10": [5, 6, 7, 8, 9],
        "fashion_mnist": [5, 6, 7],
        "imagefolder": ["cat", "dog", "3"],
        "digits": [5, 6, 7],
    }
    dm = ClassSplitDataModule(name, root=str(roots.get(name, "unused")), **{"target_classes": classes[name], **kwargs})
    dm.setup()
    return dm


def per_image(dm: ClassSplitDataModule, dataset, train: bool = False) -> torch.Tensor:
    """The per-image pipeline (``transform``) on the source images of ``dataset``."""
    pipeline = dm.transform(train)
    return torch.stack([pipeline(dataset.dataset[i][0]) for i in dataset.indices])


# ---------------------------------------------------------------- the same evaluation tensors


@pytest.mark.parametrize(
    "name, size",
    [
        ("cifar10", 32),
        ("cifar10", 40),
        ("cifar10", 24),
        ("fashion_mnist", 32),
        ("imagefolder", 16),
        ("digits", 32),
        ("digits", 8),
    ],
)
def test_evaluation_tensors_equal_the_per_image_pipeline(roots, no_system_fashion, name, size):
    dm = make(name, roots, image_size=size, batch_size=7)
    assert isinstance(dm.eval_set, ImageTensors) and isinstance(dm.train_set, ImageTensors)
    expected = per_image(dm, dm.eval_set)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        images, labels = (torch.cat(parts) for parts in zip(*loader, strict=True))
        assert images.dtype == torch.float32 and images.shape == (len(dm.eval_set), 3, size, size)
        assert torch.equal(images, expected)  # bit for bit
        assert labels.tolist() == dm.eval_set.labels
    # the training images under the eval transform (the tap cache's one view) too
    plain = dm.dataset("train", train=False)
    assert torch.equal(torch.stack([plain[i][0] for i in range(len(plain))]), per_image(dm, dm.train_set))


def test_grayscale_is_stored_as_one_channel(roots, no_system_fashion):
    dm = make("fashion_mnist", roots)
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.images.shape[1] == 1
    digits = make("digits", roots)  # scikit-learn's floats keep their exact values
    assert digits.train_set.images.dtype == torch.float32 and digits.train_set.images.shape[1:] == (1, 32, 32)


def test_large_images_keep_the_per_image_pipeline(roots):
    dm = make("imagefolder", roots, image_size=128)
    assert not isinstance(dm.train_set, ImageTensors) and not isinstance(dm.eval_set, ImageTensors)
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (3, 128, 128)


# ---------------------------------------------------------------- the augmentation's statistics


def crops(image: torch.Tensor, padding: int) -> tuple[list[tuple[int, int, bool]], torch.Tensor]:
    """Every crop of ``image`` (C, H, W) from its zero-padded copy, mirrored or not: (top, left, flip), crops."""
    _, h, w = image.shape
    padded = F.pad(image, (padding,) * 4)
    keys, found = [], []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top : top + h, left : left + w]
            keys += [(top, left, False), (top, left, True)]
            found += [crop, TF.horizontal_flip(crop)]
    return keys, torch.stack(found)


def drawn_augmentations(dm: ClassSplitDataModule, epochs: int) -> list[list[tuple[int, int, bool]]]:
    """For every training image served in ``epochs`` epochs, the (top, left, flip) that make it from its
    decoded source: every crop of the source, normalised, compared with what the loader served."""
    normalise = dm.batch_transform(train=False)
    candidates = [crops(image, dm.image_size // 8) for image in dm.train_set.images]
    candidates = [(keys, normalise(found)) for keys, found in candidates]
    loader = dm.train_dataloader()
    drawn = []
    for epoch in range(epochs):
        loader.batch_sampler.sampler.set_epoch(epoch)
        order = list(loader.batch_sampler.sampler)
        served, labels = (torch.cat(parts) for parts in zip(*loader, strict=True))
        assert labels.tolist() == [dm.train_set.labels[i] for i in order]  # each image with its own label
        for image, source in zip(served, order, strict=True):
            keys, found = candidates[source]
            close = (found - image).abs().amax(dim=(1, 2, 3)) < 1e-6
            drawn.append([key for key, match in zip(keys, close.tolist(), strict=True) if match])
    return drawn


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_crop_offsets_are_uniform_over_the_padding_and_cifar_flips_half(roots):
    torch.manual_seed(0)
    dm = make("cifar10", roots, batch_size=32)  # 80 training images, padding 4: offsets 0..8
    drawn = drawn_augmentations(dm, epochs=25)  # 2000 draws
    assert all(len(matches) == 1 for matches in drawn)  # noisy images: one crop makes each
    drawn = [matches[0] for matches in drawn]
    tops = np.bincount([t for t, _, _ in drawn], minlength=9)
    lefts = np.bincount([l for _, l, _ in drawn], minlength=9)
    assert len(tops) == len(lefts) == 9 and tops.min() > 0 and lefts.min() > 0  # every offset, none beyond
    assert chi_square(tops) < 26.1 and chi_square(lefts) < 26.1  # 8 degrees of freedom, p = 0.001
    joint = np.bincount([9 * t + l for t, l, _ in drawn], minlength=81)
    assert chi_square(joint) < 124.8  # 80 degrees of freedom, p = 0.001
    flips = sum(f for _, _, f in drawn) / len(drawn)
    assert abs(flips - 0.5) < 4 * (0.25 / len(drawn)) ** 0.5


@pytest.mark.parametrize("name", ["fashion_mnist", "digits", "imagefolder"])
def test_only_cifar_flips(roots, no_system_fashion, name):
    torch.manual_seed(0)
    dm = make(name, roots, batch_size=16, image_size=16, limit_per_class=10)
    drawn = drawn_augmentations(dm, epochs=4)
    unflipped = [[(t, l) for t, l, flip in matches if not flip] for matches in drawn]
    assert all(unflipped)  # every image is an unflipped crop (a symmetric one may match its mirror too)
    assert len({m[0] for m in unflipped if len(m) == 1}) > 10  # and cropped all the same


def test_no_augmentation_when_switched_off(roots):
    dm = make("cifar10", roots, augment=False, batch_size=16)
    assert {(4, 4, False)} == {m for matches in drawn_augmentations(dm, epochs=2) for m in matches}  # the image itself


def test_normalised_channels_have_the_configured_statistics(roots, no_system_fashion):
    """With the data's own per-channel mean and std configured, every channel comes out at mean 0, std 1
    (grayscale: the one channel three times, under three different configured statistics)."""
    for name in ("cifar10", "fashion_mnist"):
        raw = make(name, roots, augment=False).eval_set.images.double() / 255
        pixels = raw.transpose(0, 1).reshape(raw.shape[1], -1)
        mean, std = pixels.mean(1).tolist(), pixels.std(1, correction=0).tolist()
        if len(mean) == 1:
            mean, std = [mean[0], mean[0] - 0.1, mean[0] + 0.1], [std[0], 2 * std[0], std[0] / 2]
        dm = make(name, roots, normalize_mean=mean, normalize_std=std)
        images = torch.cat([images for images, _ in dm.val_dataloader()]).transpose(0, 1).reshape(3, -1).double()
        if name == "fashion_mnist":  # by the data's own statistics: (x - m) / s = out_c * s_c / s + (m_c - m) / s
            m, s = mean[0], std[0]
            images = images * torch.tensor(std).double()[:, None] / s + (torch.tensor(mean).double()[:, None] - m) / s
            assert not torch.allclose(images[0], images[1] * 2)  # the channels really differed before
        torch.testing.assert_close(images.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(images.std(1, correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_evaluation_is_never_augmented(roots):
    torch.manual_seed(0)
    dm = make("cifar10", roots, batch_size=16)
    first = torch.cat([images for images, _ in dm.val_dataloader()])
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert torch.equal(torch.cat([images for images, _ in loader]), first)
    assert not dm.eval_set.transform.augments and dm.train_set.transform.augments
    split = make("cifar10", roots, batch_size=16, val_fraction=0.25)
    assert not split.val_set.transform.augments and not split.eval_set.transform.augments


# ---------------------------------------------------------------- resume, pickling, devices


def epoch_batches(dm: ClassSplitDataModule, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(epoch)
    return list(loader)


def test_a_resumed_epoch_sees_the_same_batches(roots):
    """Order from (seed, epoch); crops and flips from torch's generator, which a checkpoint restores."""
    torch.manual_seed(3)
    straight = make("cifar10", roots, batch_size=32, seed=5)
    epoch_batches(straight, 0)
    state = torch.get_rng_state()  # what run.resume.RNGState saves with the epoch-0 checkpoint
    expected = epoch_batches(straight, 1)
    torch.manual_seed(99)  # another process, another history
    resumed = make("cifar10", roots, batch_size=32, seed=5)
    torch.set_rng_state(state)
    got = epoch_batches(resumed, 1)
    assert len(got) == len(expected) == 3
    for (a, la), (b, lb) in zip(got, expected, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_set_up_datamodule_pickles_for_ddp_spawn(roots):
    dm = make("cifar10", roots, batch_size=32)
    dm.train_dataloader()  # a placed copy (none on the CPU) is never sent
    copy = pickle.loads(pickle.dumps(dm))
    torch.manual_seed(0)
    a = epoch_batches(dm, 2)
    torch.manual_seed(0)
    b = epoch_batches(copy, 2)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))


def test_placed_copies_are_made_once_and_not_pickled():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    data = ImageTensors(images, [0, 1, 0, 1, 0], BatchTransform((0.5,) * 3, (0.5,) * 3))
    assert data.placed(torch.device("cpu"), True) is data
    meta = data.placed(torch.device("meta"), True)  # a device that holds no data: only where things go
    assert meta is data.placed(torch.device("meta"), True) and meta.images.device.type == "meta"
    assert data.placed(torch.device("meta"), False).images.device.type == "cpu"
    assert pickle.loads(pickle.dumps(data))._copies == {}


# ---------------------------------------------------------------- a last training batch of one image


def test_training_leaves_out_a_last_batch_of_one_image_and_says_so_once(caplog):
    sampler = TrainingBatches(range(65), batch_size=64, drop_last=False)
    with caplog.at_level(logging.INFO, logger="bnn_adapt.training.batches"):
        assert [len(b) for b in sampler] == [64] and len(sampler) == 1
        assert [len(b) for b in sampler] == [64]
    assert sum("one image" in r.getMessage() for r in caplog.records) == 1
    assert [len(b) for b in TrainingBatches(range(66), 64, False)] == [64, 2]
    assert [len(b) for b in TrainingBatches(range(3), 1, False)] == [1, 1, 1]  # batch size 1: nothing is a remainder
    views = ViewBatches(images=65, views=2, batch_size=64, shuffle=True, seed=0)
    assert [len(b) for b in views] == [64] and len(views) == 1
    assert [len(b) for b in ViewBatches(images=65, views=1, batch_size=64, shuffle=False, seed=0)] == [64, 1]


def test_evaluation_keeps_a_last_batch_of_one_image():
    dm = make("digits", {}, target_classes=[5, 6, 7, 8, 9], limit_per_class=13, eval_limit_per_class=13, batch_size=64)
    assert [len(labels) for _, labels in dm.train_dataloader()] == [64]
    assert [len(labels) for _, labels in dm.val_dataloader()] == [64, 1]
    assert [len(labels) for _, labels in dm.test_dataloader()] == [64, 1]


def test_digits_base_with_a_remainder_of_one_trains_and_evaluates_every_image(make_cfg, tmp_path, caplog):
    """``+experiment=digits5_5_base data.limit_per_class=13``: 65 images, batches of 64. The STE head's
    BatchNorm1d stopped every such run with ``Expected more than 1 value per channel``."""
    from bnn_adapt.run.task import run

    cfg = make_cfg(
        "+experiment=digits5_5_base",
        "data.limit_per_class=13",
        "data.eval_limit_per_class=13",
        "data.batch_size=64",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=1.0",
        "trainer.limit_val_batches=1.0",
        f"base.save_to={tmp_path / 'base.pt'}",
    )
    with caplog.at_level(logging.INFO, logger="bnn_adapt.training.batches"):
        metrics = run(cfg)
    assert metrics["status"] == "complete" and len(metrics["history"]) == 2
    assert sum("one image" in r.getMessage() for r in caplog.records) == 1
    for record in metrics["history"]:  # evaluated on all 65 held-out images: accuracies are k / 65
        assert abs(record["val/acc"] * 65 - round(record["val/acc"] * 65)) < 1e-4


def test_loader_bench_times_both_loaders_over_whole_epochs():
    from benchmarks.bench_loader import loader_records

    records = loader_records(torch.device("cpu"), images_per_class=4, batch_size=8, epochs=1)
    assert [r["loader"] for r in records] == ["tensor", "per_image"]
    assert all(r["images"] == 40 and r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in records)
