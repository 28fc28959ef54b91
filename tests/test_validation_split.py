"""A validation split carved from the training images (``data.val_fraction``, issue #23 item 2).

With it, every epoch is validated on that split and the test set is measured once, at the end;
the Pareto search selects on validation top-1 and only reports test top-1. Without it (the
default) every epoch is evaluated on the test set, the thesis's protocol, as before.
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from bnn_adapt.errors import ConfigError
from bnn_adapt.run.config import compose
from bnn_adapt.run.task import run, sweeper_value
from bnn_adapt.search.pareto import pareto_front, trial_points, write_report
from bnn_adapt.training.datamodule import ClassSplitDataModule


def digits(**kwargs) -> ClassSplitDataModule:
    dm = ClassSplitDataModule("digits", base_classes=[0, 1, 2, 3, 4], split="base", **kwargs)
    dm.setup()
    return dm


def test_the_split_is_stratified_fixed_and_disjoint_from_training():
    dm = digits(val_fraction=0.2, seed=1)
    plain = digits()
    train, val = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train & val and train | val == set(plain.train_set.indices)  # carved from the training images
    per_class = Counter(plain.train_set.labels)
    for label, n in Counter(dm.val_set.labels).items():
        assert abs(n - 0.2 * per_class[label]) <= 1  # stratified
    assert dm.eval_set.indices == plain.eval_set.indices  # the test set is untouched
    other = digits(val_fraction=0.2, seed=7)  # the run's seed does not move it
    assert other.val_set.indices == dm.val_set.indices and other.train_set.indices == dm.train_set.indices


def test_limits_apply_after_the_split():
    dm = digits(val_fraction=0.2, limit_per_class=10, eval_limit_per_class=4)
    unlimited = digits(val_fraction=0.2)
    assert Counter(dm.train_set.labels) == {k: 10 for k in range(5)}
    assert Counter(dm.val_set.labels) == {k: 4 for k in range(5)} == Counter(dm.eval_set.labels)
    assert set(dm.val_set.indices) <= set(unlimited.val_set.indices)  # the same draw, cut shorter
    assert not set(dm.train_set.indices) & set(unlimited.val_set.indices)


def test_loaders_validate_on_the_split_and_test_on_the_test_set():
    dm = digits(val_fraction=0.2, batch_size=1000)
    val_labels = next(iter(dm.val_dataloader()))[1].tolist()
    test_labels = next(iter(dm.test_dataloader()))[1].tolist()
    assert val_labels == dm.val_set.labels and test_labels == dm.eval_set.labels
    assert len(val_labels) != len(test_labels)
    plain = digits(batch_size=1000)  # no split: validation is the test set, as the thesis evaluated
    assert plain.val_set is None
    assert next(iter(plain.val_dataloader()))[1].tolist() == plain.eval_set.labels


@pytest.mark.parametrize("fraction", [-0.1, 1.0])  # "half" and true: tests/test_config_schema.py
def test_a_bad_fraction_is_one_config_error(fraction):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        ClassSplitDataModule("digits", base_classes=[0, 1], split="base", val_fraction=fraction)


def test_a_split_too_small_for_the_classes_is_one_config_error():
    with pytest.raises(ConfigError, match="data.val_fraction=0.001"):
        digits(val_fraction=0.001)


def test_a_run_validates_each_epoch_and_tests_once(make_cfg, pretrained_base):
    metrics = run(
        make_cfg(
            "data=cifar5_5",
            "adapter=udta",
            "data.val_fraction=0.25",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=1.0",
            "trainer.limit_val_batches=1.0",
        )
    )
    assert metrics["status"] == "complete"
    history = metrics["history"]
    # the last epoch's headline: with the trained BNs' statistics re-estimated (precise BN); the curve: averaged
    assert metrics["val_top1"] == metrics["val_top1_precise_bn"] == history[-1]["val/acc_precise_bn"]
    assert metrics["val_top1_averaged_bn"] == history[-1]["val/acc"]
    assert metrics["best_val_top1"] == max(h["val/acc"] for h in history)
    assert "best_test_top1" not in metrics and metrics["test_top1"] is not None
    # validation: 25 % of 5 x 16 training images = 20; test: 5 x 16 held-out images
    for value in [*(h["val/acc"] for h in history), metrics["val_top1"]]:
        assert abs(value * 20 - round(value * 20)) < 1e-4
    assert abs(metrics["test_top1"] * 80 - round(metrics["test_top1"] * 80)) < 1e-4
    out = metrics["config"]["paths"]["output_dir"]
    with open(f"{out}/csv/metrics.csv", newline="") as f:
        tested = [row for row in csv.DictReader(f) if row.get("test/acc")]
    assert len(tested) == 1 and float(tested[0]["test/acc"]) == pytest.approx(metrics["test_top1"])


def test_a_cached_run_validates_and_tests_on_their_own_features(make_cfg, pretrained_base):
    metrics = run(
        make_cfg(
            "data=cifar5_5",
            "adapter=udta",
            "tap_cache.enabled=true",
            "data.val_fraction=0.25",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=1.0",
        )
    )
    assert abs(metrics["val_top1"] * 20 - round(metrics["val_top1"] * 20)) < 1e-4
    assert abs(metrics["test_top1"] * 80 - round(metrics["test_top1"] * 80)) < 1e-4


def test_without_a_split_every_epoch_is_tested_as_before(make_cfg, pretrained_base):
    metrics = run(make_cfg("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=2"))
    assert metrics["test_top1"] == metrics["history"][-1]["val/acc_precise_bn"]  # the head's BN, re-estimated
    assert metrics["test_top1_averaged_bn"] == metrics["history"][-1]["val/acc"]
    assert "val_top1" not in metrics and "best_test_top1" in metrics


def test_the_search_selects_on_validation():
    cfg = compose(["+experiment=digits5_5", "hparams_search=size_vs_accuracy"])
    assert list(cfg.optimized_metrics) == ["val_top1", "size_pct"] and cfg.data.val_fraction > 0
    metrics = {"val_top1": 0.7, "test_top1": 0.9, "size_pct": 2.0, "status": "complete"}
    assert sweeper_value(cfg, metrics) == (0.7, 2.0)


def test_the_front_is_chosen_on_validation_and_reports_test(tmp_path):
    """Trial b is better than a on the test set but not on validation: the front keeps a, and
    trials.csv shows both accuracies."""
    trials = {"a": (0.80, 0.60, 2.0), "b": (0.70, 0.95, 2.0), "c": (0.60, 0.50, 1.0), "old": (None, 0.99, 0.5)}
    for name, (val, test, size) in trials.items():
        (tmp_path / name).mkdir()
        metrics = {"status": "complete", "test_top1": test, "size_pct": size, "config": {"adapter": {"name": "udta"}}}
        if val is not None:
            metrics["val_top1"] = val
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    points = trial_points(tmp_path)
    assert sorted(p["run_dir"].rsplit("/", 1)[1] for p in points) == ["a", "b", "c"]  # no validation: left out
    assert [p["run_dir"].rsplit("/", 1)[1] for p in pareto_front(points)] == ["c", "a"]
    files = write_report(tmp_path)
    with files["trials"].open() as f:
        rows = {row["run_dir"].rsplit("/", 1)[1]: row for row in csv.DictReader(f)}
    assert float(rows["b"]["test_top1"]) == 0.95 and float(rows["b"]["val_top1"]) == 0.70
    assert rows["a"]["on_front"] == "True" and rows["b"]["on_front"] == "False"
