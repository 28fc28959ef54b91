"""End to end through the real config and ``bnn_adapt.task.run``: pretrain a tiny
STE base on generated CIFAR-10 files, adapt it with every strategy, prune, and
check what each run leaves on disk."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnn_adapt.adapters.file import stored_tensors
from bnn_adapt.bases import load_base
from bnn_adapt.errors import CheckpointError
from bnn_adapt.run import builders, task
from bnn_adapt.training.datasets.cifar10 import CLASSES as CIFAR10_CLASSES
from bnn_adapt.training.pruning import PruningPlan

SUMMARY_KEYS = {
    "base_binary_params",
    "base_fp32_params",
    "adapter_fp32_params",
    "adapter_binary_params",
    "head_fp32_params",
    "head_binary_params",
    "size_pct",
    "adapter_size_pct",
}
RUN_KEYS = {
    "test_top1",
    "best_test_top1",
    "epoch_time_s",
    "step_time_s",
    "peak_mem_bytes",
    "seed",
    "versions",
    "config",
}

STRATEGIES = {
    "head_only": ["adapter=head_only"],
    "full_finetune": ["adapter=full_finetune"],
    "serial": ["adapter=serial", "adapter.stages=[1,2,3]"],
    "udta_concat": ["adapter=udta", "adapter.head=concat"],
    "udta_adapter_head": ["adapter=udta", "adapter.head=adapter"],
}
FROZEN_BASE = [name for name in STRATEGIES if name != "full_finetune"]


# ------------------------------------------------------------------ helpers


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def epoch_train_losses(run_dir: Path) -> list[float]:
    """Mean train loss of each epoch, in epoch order, from the Lightning CSV log."""
    losses = {int(r["epoch"]): float(r["train/loss_epoch"]) for r in csv_rows(run_dir) if r.get("train/loss_epoch")}
    return [losses[e] for e in sorted(losses)]


def checkpoint_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def stored_base_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def base_in_checkpoint(state: dict) -> dict[str, torch.Tensor]:
    prefix = "model.base."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def is_running_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def assert_run_dir(run_dir: Path, metrics: dict) -> None:
    """Every adaptation run leaves the resolved config, its logs, a checkpoint, the adapter and metrics."""
    for name in ("csv/metrics.csv", "checkpoints/last.ckpt", "adapter.safetensors", "metrics.json"):
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
    on_disk = read_json(run_dir / "metrics.json")
    missing = (RUN_KEYS | SUMMARY_KEYS) - on_disk.keys()
    assert not missing, f"metrics.json lacks {sorted(missing)}"
    assert on_disk["seed"] == 42 and torch.__version__.startswith(on_disk["versions"]["torch"])
    # the resolved config: no interpolation left, and the paths this run really used
    config = on_disk["config"]
    assert "${" not in json.dumps(config) and "hydra" not in config
    assert config["paths"]["output_dir"] == str(run_dir)
    # the per-epoch curve has the averaged BN statistics; the headline, those re-estimated at the end (precise BN)
    last = metrics["history"][-1]
    assert on_disk["test_top1"] == pytest.approx(last.get("val/acc_precise_bn", last["val/acc"]))
    assert 0.0 <= on_disk.get("test_top1_averaged_bn", on_disk["test_top1"]) <= on_disk["best_test_top1"] <= 1.0
    assert on_disk["epoch_time_s"] > 0 and on_disk["step_time_s"] > 0 and on_disk["peak_mem_bytes"] > 0


def adapt(make_cfg, strategy: str, *extra: str, name: str = "run") -> tuple[dict, Path]:
    cfg = make_cfg("data=cifar5_5", *STRATEGIES[strategy], *extra, name=name)
    metrics = task.run(cfg)
    return metrics, Path(cfg.paths.output_dir)


# ------------------------------------------------------------------ pretraining


def test_pretrain_writes_base_checkpoint_and_metrics(pretrained_base):
    path, out = pretrained_base["checkpoint"], pretrained_base["output_dir"]
    assert path.is_file() and path.name == "ste_resnet_cifar_thesis_w0.1_cifar10_0-4.pt"
    payload = torch.load(path, map_location="cpu", weights_only=False)
    assert payload["arch"] == "ste_resnet_cifar"
    assert payload["base_classes"] == list(CIFAR10_CLASSES[:5])
    base = load_base("ste_resnet_cifar", path, "unused")
    assert base.num_classes == 5 and base.stage_channels == [8, 16, 32]

    metrics = read_json(out / "metrics.json")
    required = {
        "test_top1",
        "best_test_top1",
        "epoch_time_s",
        "step_time_s",
        "peak_mem_bytes",
        "base_binary_params",
        "base_fp32_params",
        "base_checkpoint",
        "seed",
        "versions",
        "config",
    }
    assert not required - metrics.keys()
    assert metrics["task"] == "pretrain" and metrics["base_checkpoint"] == str(path)
    assert payload["top1"] == pytest.approx(metrics["test_top1"])
    losses = epoch_train_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0]


# ------------------------------------------------------------------ adaptation


def saved_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's adapter file, every stored tensor decoded at full shape (``adapter.*``, ``head.*``, ``base.*``)."""
    cfg = OmegaConf.create(read_json(run_dir / "metrics.json")["config"])
    return stored_tensors(run_dir / "adapter.safetensors", builders.load_trained_base(cfg))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_adapt_strategy_trains_only_what_it_should(strategy, pretrained_base, make_cfg):
    # a binary head flips few signs at lr 1e-3 in these 15 steps: its loss trend is noise (issue #24's stream)
    faster = ("adapter.lr=1e-2",) if strategy == "head_only" else ()
    metrics, run_dir = adapt(make_cfg, strategy, "base.bn=frozen", *faster)
    assert_run_dir(run_dir, metrics)
    assert metrics["strategy"] == ("udta" if strategy.startswith("udta") else strategy)
    assert metrics["class_names"] == list(CIFAR10_CLASSES[5:])
    assert metrics["config"]["base"]["checkpoint"] == str(pretrained_base["checkpoint"])

    # the frozen base, BN running statistics included, is bit-identical after training
    before = stored_base_state(pretrained_base["checkpoint"])
    after = base_in_checkpoint(checkpoint_state(run_dir))
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if strategy == "full_finetune":
        assert any(not is_running_stat(k) for k in changed), "full finetuning left every base weight unchanged"
    else:
        assert changed == [], f"{strategy} changed the frozen base: {changed}"

    # the saved adapter + head: what the task introduced, in the accounting's numbers
    saved = saved_tensors(run_dir)
    assert saved and all(k.startswith(("adapter.", "head.", "base.")) for k in saved)
    assert any(k.startswith("head.") for k in saved)
    assert any(k.startswith("adapter.") for k in saved) == (strategy not in ("head_only", "full_finetune"))
    assert any(k.startswith("base.") for k in saved) == (strategy == "full_finetune")  # the finetuned base travels
    if strategy == "head_only":
        assert metrics["adapter_fp32_params"] == 0 and metrics["adapter_binary_params"] == 0
    head_params = sum(v.numel() for k, v in saved.items() if k.startswith("head.") and not is_running_stat(k))
    assert metrics["head_fp32_params"] + metrics["head_binary_params"] == head_params

    # learning happened: mean train loss of the last epoch below the first's
    losses = epoch_train_losses(run_dir)
    assert len(losses) == 3
    assert losses[-1] < losses[0], f"{strategy}: train loss per epoch {losses}"
    history_losses = [h["train/loss_epoch"] for h in metrics["history"]]
    assert history_losses == pytest.approx(losses)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_only_intended_parameters_receive_gradients(strategy, pretrained_base, make_cfg):
    """One manual forward/backward on the model as run() builds it."""
    from bnn_adapt.training.module import Classifier

    cfg = make_cfg("data=cifar5_5", *STRATEGIES[strategy], "base.bn=frozen")
    model = builders.build_adapted(cfg, builders.load_trained_base(cfg), 5)
    model.train()
    base_outputs_with_grad = []

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            base_outputs_with_grad.append(type(module).__name__)

    hooks = [m.register_forward_hook(record) for m in model.base.modules()]
    torch.manual_seed(0)
    logits = model(torch.randn(8, 3, 32, 32))
    nn.functional.cross_entropy(logits, torch.arange(8) % 5).backward()
    for h in hooks:
        h.remove()

    introduced = model.introduced_modules()
    head = [p for m in introduced["head"] for p in m.parameters()]
    adapter = [p for m in introduced["adapter"] for p in m.parameters()]
    assert head and all(p.grad is not None for p in head)
    assert all(p.grad is not None for p in adapter)
    assert bool(adapter) == (strategy != "head_only")
    base_params = dict(model.base.named_parameters())
    if strategy == "full_finetune":
        used = {k: p for k, p in base_params.items() if not k.startswith("classifier.")}
        assert all(p.requires_grad for p in base_params.values())
        assert all(p.grad is not None for p in used.values())
        return
    assert all(not p.requires_grad and p.grad is None for p in base_params.values())
    # base BN layers stay in eval mode (base.bn=frozen) while the new parts train
    assert not any(m.training for m in model.base.modules())
    assert all(m.training for m in introduced["head"])
    if strategy.startswith("udta") or strategy == "head_only":
        # the base runs without autograd at all: no activation of it is recorded for backward
        assert base_outputs_with_grad == []
    # the optimiser sees exactly the introduced parameters
    module = Classifier(model, 5, builders.instantiate(cfg.optimizer))
    optimised = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimised == {id(p) for p in head + adapter}


@pytest.mark.parametrize("strategy", ["udta_concat", "serial"])
def test_bn_adapt_lets_base_running_stats_drift(strategy, pretrained_base, make_cfg):
    """The thesis quirk (base.bn=adapt): base weights fixed, BN running statistics move."""
    metrics, run_dir = adapt(make_cfg, strategy, "base.bn=adapt")
    before = stored_base_state(pretrained_base["checkpoint"])
    after = base_in_checkpoint(checkpoint_state(run_dir))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "base.bn=adapt left the base's running statistics untouched"
    assert all(is_running_stat(k) for k in changed), sorted(changed)
    assert any(k.endswith("running_mean") for k in changed)
    assert metrics["config"]["base"]["bn"] == "adapt"


# ------------------------------------------------------------------ pruning


class PruningProbe(L.Callback):
    """After each train epoch (pruning included), records the adapter's zero patterns."""

    def __init__(self):
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        depthwise, pointwise = pl_module.model.prune_targets()
        self.epochs.append(
            {
                "epoch": trainer.current_epoch,
                "pointwise_zero": [(m.weight == 0).detach().clone() for m in pointwise],
                "depthwise_zero_filters": [(m.weight.flatten(1) == 0).all(dim=1).detach().clone() for m in depthwise],
                "has_masks": all(hasattr(m, "weight_mask") for m in depthwise + pointwise),
            }
        )


def test_prune_zeroes_the_configured_fraction_and_keeps_it(pretrained_base, make_cfg, monkeypatch):
    rate, epochs = 0.5, 4  # pruning after epoch index 1 (epochs // 2 = 2: epochs 2 and 3 run pruned)
    probe = PruningProbe()
    original = PruningPlan.callbacks
    monkeypatch.setattr(PruningPlan, "callbacks", lambda *args: [*original(*args), probe])
    metrics, run_dir = adapt(
        make_cfg, "udta_concat", "reduction=prune", f"reduction.rate={rate}", f"trainer.max_epochs={epochs}"
    )
    assert [e["epoch"] for e in probe.epochs] == list(range(epochs))

    # nothing pruned before the pruning epoch
    first = probe.epochs[0]
    assert not any(z.any() for z in first["pointwise_zero"]) and not first["has_masks"]
    # after epoch index 1: the rate of each pointwise weight and whole depthwise filters are zero
    pruned = probe.epochs[1]
    assert pruned["has_masks"]
    for zeros in pruned["pointwise_zero"]:
        assert int(zeros.sum()) == round(rate * zeros.numel())
    for filters in pruned["depthwise_zero_filters"]:
        assert int(filters.sum()) == round(rate * filters.numel())
    # training on keeps the pruned weights at zero
    last = probe.epochs[-1]
    for before, after in zip(pruned["pointwise_zero"], last["pointwise_zero"], strict=True):
        assert after[before].all()
    for before, after in zip(pruned["depthwise_zero_filters"], last["depthwise_zero_filters"], strict=True):
        assert after[before].all()

    # files: pruning made permanent (no masks, no *_orig), zeros where the masks were
    ckpt = checkpoint_state(run_dir)
    saved = saved_tensors(run_dir)
    for state in (ckpt, saved):
        assert not [k for k in state if k.endswith(("_mask", "_orig"))]
    pointwise = sorted(k for k in saved if k.endswith("pointwise.weight"))
    depthwise = sorted(k for k in saved if k.endswith("depthwise.weight"))
    assert len(pointwise) == len(depthwise) == 3
    for key, zeros in zip(pointwise, pruned["pointwise_zero"], strict=True):
        assert torch.equal(saved[key] == 0, zeros)
        assert torch.equal(ckpt["model." + key] == 0, zeros)  # the checkpoint names it "model.adapter.<key>"
    for key, filters in zip(depthwise, pruned["depthwise_zero_filters"], strict=True):
        assert torch.equal((saved[key].flatten(1) == 0).all(dim=1), filters)

    # headline = the final (pruned) epoch; best-before-pruning reported beside it
    history = metrics["history"]
    assert metrics["test_top1"] == pytest.approx(history[-1]["val/acc_precise_bn"])  # the BNs it trains, re-estimated
    assert metrics["test_top1_averaged_bn"] == pytest.approx(history[-1]["val/acc"])
    assert metrics["best_before_pruning_top1"] == pytest.approx(max(h["val/acc"] for h in history[:2]))
    assert metrics["best_test_top1"] == pytest.approx(max(h["val/acc"] for h in history[2:]))
    # counts: the non-zeros, as in the stored adapter
    adapter_params = {k: v for k, v in saved.items() if k.startswith("adapter.") and not is_running_stat(k)}
    pruned_keys = set(pointwise + depthwise)
    nonzeros = sum(int(v.count_nonzero()) if k in pruned_keys else v.numel() for k, v in adapter_params.items())
    assert metrics["adapter_fp32_params"] == nonzeros
    assert metrics["adapter_binary_params"] == 0
    unpruned = sum(v.numel() for v in adapter_params.values())
    assert nonzeros < unpruned
    on_disk = read_json(run_dir / "metrics.json")
    assert on_disk["adapter_fp32_params"] == nonzeros and "best_before_pruning_top1" in on_disk


# ------------------------------------------------------------------ missing bases


@pytest.mark.parametrize(
    ("experiment", "hint"),
    [
        ("cifar5_5_head_only", r"pretrain it first with `python -m bnn_adapt \+experiment=cifar5_5_base "),
        ("flowers102_udta", "liuzechun/ReActNet"),
    ],
)
def test_missing_base_checkpoint_is_a_clear_error(experiment, hint, make_cfg, tmp_path):
    cfg = make_cfg(f"+experiment={experiment}", "base.width=0.1", base_dir=tmp_path / "no_bases")
    with pytest.raises(CheckpointError, match=hint) as err:
        task.run(cfg)
    if cfg.base.checkpoint is not None:
        assert str(cfg.base.checkpoint) in str(err.value)
    # the failure is recorded where the results would have been, never as a result
    failed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "CheckpointError" in failed["error"] and "test_top1" not in failed


@pytest.mark.parametrize("threads", [1, 2])  # issue 23: a run repeats bit for bit at any given thread count
def test_digits_default_pretrains_and_caches_a_missing_base(make_cfg, tmp_path, capsys, threads):
    bases = tmp_path / "bases"
    quick = (
        "base.pretrain.epochs=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        f"threads={threads}",
    )
    cfg = make_cfg(*quick, name="first", base_dir=bases)
    assert cfg.data.name == "digits" and cfg.adapter.name == "udta"
    expected = bases / "ste_resnet_cifar_thesis_w0.1_digits_0-4.pt"
    assert not expected.exists() and Path(cfg.base.checkpoint) == expected

    metrics = task.run(cfg)
    assert expected.is_file(), "the pretrained base was not cached at base.checkpoint"
    assert "pretraining it first" in capsys.readouterr().out
    pretrain = read_json(tmp_path / "first" / "base_pretrain" / "metrics.json")
    assert pretrain["task"] == "pretrain" and pretrain["base_checkpoint"] == str(expected)
    assert pretrain["epochs_run"] == 1
    assert metrics["task"] == "adapt" and metrics["class_names"] == ["5", "6", "7", "8", "9"]
    stamp = expected.stat().st_mtime_ns

    # a second run finds the cached base, trains no new one and adapts exactly as the first did
    again = task.run(make_cfg(*quick, name="second", base_dir=bases))
    assert "pretraining it first" not in capsys.readouterr().out
    losses = [[row[k] for k in sorted(row) if "loss" in k or "acc" in k] for row in metrics["history"]]
    assert losses and losses == [[row[k] for k in sorted(row) if "loss" in k or "acc" in k] for row in again["history"]]
    assert expected.stat().st_mtime_ns == stamp
    assert not (tmp_path / "second" / "base_pretrain").exists()


# ------------------------------------------------------------------ your own images


def test_imagefolder_adapts_on_named_and_numeric_class_folders(pretrained_base, make_cfg):
    cfg = make_cfg(
        "data=imagefolder",
        "data.base_classes=[cat,3]",
        "data.target_classes=[dog,7,bird]",
        "adapter=udta",
        f"base.checkpoint={pretrained_base['checkpoint']}",
    )
    metrics = task.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert metrics["class_names"] == ["dog", "7", "bird"]
    assert_run_dir(run_dir, metrics)
    saved = saved_tensors(run_dir)
    assert saved["head.1.weight"].shape == (3,)  # BN1d over the 3 target classes
    assert metrics["config"]["data"]["target_classes"] == ["dog", 7, "bird"]
