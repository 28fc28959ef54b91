"""Iterative (lottery-ticket style) pruning and structured pruning of the new
classifier's input columns (thesis future work): schedules, the
sparsity after each round, rewinding, counts in summary_only and metrics.json."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from bnn_adapt.accounting import summarize
from bnn_adapt.adapters import HeadOnly, Parallel
from bnn_adapt.adapters.file import stored_tensors
from bnn_adapt.adapters.strategy import ColumnPrunedLinear
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.errors import ConfigError
from bnn_adapt.run import builders, task
from bnn_adapt.training.pruning import (
    PruningPlan,
    cumulative_fraction,
    iterative_schedule,
    make_head_prunable,
    per_round_fraction,
    prune_head_columns,
)


def test_rounds_compound_to_the_rate():
    for rate, rounds in [(0.9, 3), (0.5, 2), (0.99, 5), (0.8, 1)]:
        p = per_round_fraction(rate, rounds)
        assert 1 - (1 - p) ** rounds == pytest.approx(rate)
        assert cumulative_fraction(rate, rounds, rounds) == rate
        assert cumulative_fraction(rate, 1, rounds) == pytest.approx(p)


def test_schedule_spreads_rounds_and_rejects_impossible_ones():
    assert iterative_schedule(3, None, 75) == [18, 37, 56]
    assert iterative_schedule(2, None, 3) == [1, 2]
    assert iterative_schedule(2, [2, 5], 8) == [2, 5]
    with pytest.raises(ConfigError, match="max_epochs >= 4"):
        iterative_schedule(3, None, 3)
    with pytest.raises(ConfigError, match="reduction.at_epochs"):
        iterative_schedule(2, [3, 2], 8)
    with pytest.raises(ConfigError, match="reduction.at_epochs"):
        iterative_schedule(2, [2, 8], 8)  # the last round must leave an epoch to train pruned
    with pytest.raises(ConfigError, match="reduction.rounds"):
        iterative_schedule(0, None, 8)


def test_prune_now_in_rounds_reaches_the_rate_per_layer():
    torch.manual_seed(0)
    model = Parallel(STEResNetCIFAR(num_classes=5, width=0.25), num_classes=5)
    PruningPlan(0.75, 0.9, tuple(range(1, 3 + 1))).apply(model)
    depthwise, pointwise = model.prune_targets()
    for m in pointwise:
        zeros = int((m.weight == 0).sum())
        assert abs(zeros - 0.9 * m.weight.numel()) <= 3  # one rounding per round
    for m in depthwise:
        dead = int((m.weight.flatten(1) == 0).all(dim=1).sum())
        assert abs(dead - 0.75 * m.weight.shape[0]) <= 3


# ------------------------------------------------------------------ head columns


@pytest.mark.parametrize("base_kind", ["binary", "fp32"])
def test_pruned_head_columns_really_drop_features(base_kind):
    """A binary head cannot zero a weight (sign(0) = +1): the column mask acts after binarisation."""
    from bnn_adapt.bases.reactnet import ReActNet18

    torch.manual_seed(0)
    base = STEResNetCIFAR(num_classes=5, width=0.1) if base_kind == "binary" else ReActNet18(10, 0.125)
    model = HeadOnly(base, num_classes=4).eval()
    features = torch.randn(6, base.stage_channels[-1])
    with torch.no_grad():
        before = model.head(features)
        layer = make_head_prunable(model)
        assert isinstance(layer, ColumnPrunedLinear) and layer.binary == (base_kind == "binary")
        assert torch.equal(model.head(features), before)  # all columns kept: the same layer
        prune_head_columns(model, 0.5)
        kept = layer.kept_columns
        assert int((~kept).sum()) == round(0.5 * layer.in_features)
        # the dropped features no longer matter at all
        scrambled = features.clone()
        scrambled[:, ~kept] = torch.randn_like(scrambled[:, ~kept]) * 10
        assert torch.equal(model.head(features), model.head(scrambled))
        # the dropped columns are the smallest-L1 ones
        norms = layer.weight.abs().sum(dim=0)
        assert norms[~kept].max() <= norms[kept].min()
    s = summarize(model)
    in_kept, c = int(kept.sum()), 4
    if base_kind == "binary":
        assert s["head_binary_params"] == in_kept * c + c  # weight columns kept + bias (binary, as the thesis)
    else:
        assert s["head_fp32_params"] == in_kept * c + c


# ------------------------------------------------------------------ end to end


def effective_weight(m: torch.nn.Module) -> torch.Tensor:
    """What the next forward uses (PyTorch recomputes ``weight`` from ``weight_orig * weight_mask`` then)."""
    w = m.weight_orig * m.weight_mask if hasattr(m, "weight_orig") else m.weight
    return w.detach().clone()


class RoundProbe(L.Callback):
    """After each train epoch: the pointwise weights (zeros = pruned); the initial weights at the start."""

    def __init__(self):
        self.initial: list[torch.Tensor] = []
        self.epochs: list[list[torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.initial = [effective_weight(m) for m in pl_module.model.prune_targets()[1]]

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append([effective_weight(m) for m in pl_module.model.prune_targets()[1]])


def run_with_probe(make_cfg, monkeypatch, *overrides, name="run"):
    probe = RoundProbe()
    original = PruningPlan.callbacks
    monkeypatch.setattr(PruningPlan, "callbacks", lambda *args: [*original(*args), probe])
    cfg = make_cfg("data=cifar5_5", "adapter=udta", *overrides, name=name)
    metrics = task.run(cfg)
    return metrics, Path(cfg.paths.output_dir), probe


ITERATIVE = ("reduction=prune_iterative", "reduction.rate=0.75", "reduction.rounds=2", "trainer.max_epochs=4")


def test_iterative_rounds_reach_the_rate_and_counts_match_summary(pretrained_base, make_cfg, monkeypatch):
    # rounds before epochs 1 and 2 (4 // 3 = 1, 8 // 3 = 2): pruning after epoch indices 0 and 1
    metrics, run_dir, probe = run_with_probe(make_cfg, monkeypatch, *ITERATIVE, "reduction.head_rate=0.5")
    first, second = per_round_fraction(0.75, 2), 0.75
    for weights, fraction in ((probe.epochs[0], first), (probe.epochs[1], second), (probe.epochs[3], second)):
        for w in weights:
            assert abs(int((w == 0).sum()) - fraction * w.numel()) <= 2, fraction
    # zeros of round 1 stay zero in round 2 (PyTorch counts the new amount against the survivors)
    for w1, w2 in zip(probe.epochs[0], probe.epochs[1], strict=True):
        assert (w2[w1 == 0] == 0).all()
    # headline = final epoch; best-before-pruning before the first round; best after the last round
    history = metrics["history"]
    assert metrics["best_before_pruning_top1"] == pytest.approx(history[0]["val/acc"])
    assert metrics["best_test_top1"] == pytest.approx(max(h["val/acc"] for h in history[2:]))

    saved = stored_tensors(
        run_dir / "adapter.safetensors", builders.load_trained_base(make_cfg("data=cifar5_5", name="b"))
    )
    nonzero = sum(
        int(v.count_nonzero()) if k.endswith(("pointwise.weight", "depthwise.weight")) else v.numel()
        for k, v in saved.items()
        if k.startswith("adapter.") and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert metrics["adapter_fp32_params"] == nonzero
    # the head: half of its 64 input columns (32 base + 32 adapter features) switched off
    kept = saved["head.0.kept_columns"]
    assert int((~kept).sum()) == 32
    assert metrics["head_binary_params"] == 32 * 5 + 5
    summary = task.run(
        make_cfg(
            "data=cifar5_5", "adapter=udta", *ITERATIVE, "reduction.head_rate=0.5", "summary_only=true", name="summary"
        )
    )
    for key in ("adapter_fp32_params", "head_binary_params", "head_fp32_params"):
        assert summary[key] == metrics[key], key


@pytest.mark.parametrize("rewind", [True, False])
def test_rewind_resets_survivors_to_their_initial_values(rewind, pretrained_base, make_cfg, monkeypatch):
    overrides = (*ITERATIVE, "reduction.rounds=1", "trainer.max_epochs=2", f"reduction.rewind={rewind}")
    _, _, probe = run_with_probe(make_cfg, monkeypatch, *overrides)
    pruned = probe.epochs[0]  # right after the only round (end of epoch 0)
    for w, w0 in zip(pruned, probe.initial, strict=True):
        survivors = w != 0
        assert int((~survivors).sum()) == round(0.75 * w.numel())
        assert torch.equal(w[survivors], w0[survivors]) == rewind
