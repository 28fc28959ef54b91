"""Tap cache (tap_cache.enabled, docs/speed.md): cached base features stand in for the
frozen base exactly; the cache states its size first and refuses what does not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnn_adapt.adapters import STRATEGIES, HeadOnly, Parallel
from bnn_adapt.bases import ReActNet18, STEResNetCIFAR
from bnn_adapt.errors import ConfigError
from bnn_adapt.training.datamodule import ClassSplitDataModule
from bnn_adapt.training.tap_cache import CachedFeatures, TapCacheDataModule, ViewBatches, estimate


def grads(model, inputs, y):
    model.zero_grad(set_to_none=True)
    out = model(inputs)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: Parallel(STEResNetCIFAR(5, width=0.1), 5, head="concat"),
        lambda: Parallel(STEResNetCIFAR(5, width=0.1), 5, head="adapter"),
        lambda: HeadOnly(STEResNetCIFAR(5, width=0.1), 5),
        lambda: Parallel(ReActNet18(10, width=0.0625), 5),
    ],
)
def test_cached_features_train_exactly_like_images(make_model):
    torch.manual_seed(0)
    model = make_model().train()
    size = 32 if isinstance(model.base, ReActNet18) else 16
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 5, (4,))
    assert model.can_cache_features()
    out_images, grads_images = grads(model, x, y)
    with torch.no_grad():
        features = tuple(f.clone() for f in model.frozen_features(x))
    out_cached, grads_cached = grads(model, features, y)
    assert torch.equal(out_images, out_cached)
    assert grads_images.keys() == grads_cached.keys()
    for name in grads_images:
        assert torch.equal(grads_images[name], grads_cached[name]), name


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s not in ("udta", "head_only")])
def test_strategies_whose_gradients_reach_the_base_cannot_cache(strategy):
    model = STRATEGIES[strategy](STEResNetCIFAR(5, width=0.1), 5)
    assert not model.can_cache_features()
    with pytest.raises(ConfigError, match="tap_cache.enabled"):
        TapCacheDataModule(ClassSplitDataModule("digits", base_classes=[0, 1], target_classes=[5, 6]), model)


def test_drifting_base_bn_cannot_cache():
    model = Parallel(STEResNetCIFAR(5, width=0.1), 5, freeze_bn=False)
    assert not model.can_cache_features()
    with pytest.raises(ConfigError, match="base.bn=adapt"):
        TapCacheDataModule(ClassSplitDataModule("digits", base_classes=[0, 1], target_classes=[5, 6]), model)


def digits(**kwargs) -> ClassSplitDataModule:
    dm = ClassSplitDataModule(
        "digits",
        base_classes=[0, 1, 2, 3, 4],
        target_classes=[5, 6, 7, 8, 9],
        image_size=16,
        batch_size=16,
        limit_per_class=6,
        eval_limit_per_class=4,
        **kwargs,
    )
    dm.setup()
    return dm


def test_estimate_counts_every_view_and_eval_image():
    model = Parallel(STEResNetCIFAR(5, width=0.1), 5)
    dm = digits()
    size = estimate(model, dm, views=3)
    c = model.base.stage_channels
    per_image = 4 * (c[0] * 16 * 16 + c[1] * 8 * 8 + c[2] * 4 * 4 + c[2])  # taps + pre-classifier vector
    assert size.bytes_per_image == per_image
    assert size.total_bytes == (30 * 3 + 20) * per_image
    assert "30 train images x 3 view(s) + 20 eval images" in size.describe()
    assert estimate(model, dm, views=3, max_gb=1e-9).fits is False


def test_a_cache_that_does_not_fit_is_refused_before_building():
    model = Parallel(STEResNetCIFAR(5, width=0.1), 5)
    cache = TapCacheDataModule(digits(), model, max_gb=1e-6)
    with pytest.raises(ConfigError, match="does not fit.*tap_cache.views"):
        cache.setup("fit")
    assert cache.train_features is None


def test_cache_holds_every_view_and_serves_one_per_image_per_epoch():
    torch.manual_seed(0)
    model = HeadOnly(STEResNetCIFAR(5, width=0.1), 5)
    cache = TapCacheDataModule(digits(), model, views=2)
    cache.setup("fit")
    train = cache.train_features
    assert train.images == 30 and train.features[0].shape[0] == 60
    # two augmented views of an image differ; the eval set is one plain view
    assert not torch.equal(train.features[0][0], train.features[0][30])
    assert cache.eval_features.features[0].shape[0] == 20
    loader = cache.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = list(loader)
    labels = torch.cat([b[1] for b in batches])
    assert len(labels) == 30 and sorted(labels.tolist()) == sorted(train.labels.tolist())
    first_epoch = [b[1] for b in batches]
    loader.sampler.set_epoch(1)
    assert all(
        torch.equal(a, b[1]) for a, b in zip(first_epoch, loader, strict=True)
    )  # (seed, epoch) fixes the batches
    features, _ = batches[0]
    assert isinstance(features, (tuple, list)) and model(features).shape == (len(batches[0][1]), 5)


def test_view_batches_choose_views_in_range_and_cover_each_image_once():
    sampler = ViewBatches(images=10, views=3, batch_size=4, shuffle=True, seed=7)
    flat = [i for batch in sampler for i in batch]
    assert len(flat) == 10 and sorted(i % 10 for i in flat) == list(range(10))
    assert all(0 <= i < 30 for i in flat) and len(sampler) == 3
    dataset = CachedFeatures([torch.arange(30.0)], torch.arange(10) % 2, views=3)
    features, labels = dataset[flat[:4]]
    assert torch.equal(features[0], torch.tensor(flat[:4], dtype=torch.float32))


def test_cached_run_end_to_end(make_cfg, pretrained_base):
    from bnn_adapt.run.task import run

    metrics = run(
        make_cfg(
            "data=cifar5_5",
            "adapter=udta",
            "tap_cache.enabled=true",
            "tap_cache.views=2",
            "memory=lean",
            "trainer.max_epochs=2",
        )
    )
    assert metrics["status"] == "complete" and metrics["test_top1"] is not None
    assert metrics["epochs_run"] == 2


def test_cache_with_one_view_and_no_augmentation_trains_like_the_images(make_cfg, pretrained_base, monkeypatch):
    """tap_cache.views=1 is the un-augmented pipeline: the same batches, exactly the same results.

    The cache is built through its real path in several batches (BUILD_BATCH shrunk to 7 images,
    the last batch partial), and every epoch's record and the final top-1 are compared exactly.
    """
    from bnn_adapt.run.task import run
    from bnn_adapt.training import tap_cache

    monkeypatch.setattr(tap_cache, "BUILD_BATCH", 7)
    built = []
    real_build = tap_cache.build_features
    monkeypatch.setattr(tap_cache, "build_features", lambda *a, **k: built.append(a[1]) or real_build(*a, **k))
    common = ("data=cifar5_5", "adapter=udta", "data.augment=false", "trainer.max_epochs=2")
    plain = run(make_cfg(*common, name="plain"))
    cached = run(make_cfg(*common, "tap_cache.enabled=true", name="cached"))
    assert len(built) == 2 and all(len(subset) % 7 for subset in built)  # train and eval sets, partial last batches
    assert plain["status"] == cached["status"] == "complete"
    assert len(plain["history"]) == len(cached["history"]) == 2
    assert plain["history"] == cached["history"]
    assert plain["test_top1"] == cached["test_top1"] and plain["best_test_top1"] == cached["best_test_top1"]


class Views(torch.utils.data.Dataset):
    """``n`` images whose every pass yields a different, known view: image i, pass p = x_i + p."""

    def __init__(self, images: torch.Tensor):
        self.images, self.labels, self.passes = images, list(range(len(images))), [0] * len(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        view = self.images[i] + self.passes[i]
        self.passes[i] += 1
        return view, self.labels[i]


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: Parallel(STEResNetCIFAR(5, width=0.1), 5, head="concat"),
        lambda: HeadOnly(STEResNetCIFAR(5, width=0.1), 5),
    ],
)
def test_build_stores_every_view_view_major_in_batches(make_model, monkeypatch):
    """build_features: pass v over the images fills rows v * n ... v * n + n - 1, batch by batch,
    each row equal to the base's features of that view of that image. (Computed here for all ten
    images at once: oneDNN's stem conv rounds differently for a batch of one, 2e-6 apart, and
    identically for any batch of two or more.)"""
    from bnn_adapt.training import tap_cache

    monkeypatch.setattr(tap_cache, "BUILD_BATCH", 4)  # 10 images: batches of 4, 4 and 2
    torch.manual_seed(0)
    model = make_model().train()
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    store, labels = tap_cache.build_features(model, Views(images), views=3, device=torch.device("cpu"))
    assert model.training  # the build ran in eval mode and put the model back
    assert torch.equal(labels, torch.arange(10))
    model.eval()
    for view in range(3):
        with torch.no_grad():
            expected = model.frozen_features(images + view)
        assert len(store) == len(expected)
        for kept, features in zip(store, expected, strict=True):
            assert kept.shape[0] == 30
            assert torch.equal(kept[view * 10 : view * 10 + 10], features), view
