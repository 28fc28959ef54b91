"""The lean training step (issue #24): divergence found within ``log_every_n_steps`` steps
and named by its step, the step loss logged only when Lightning writes its logs, the
epoch's mean loss weighted by batch size, and latent clamping over a list built once
per epoch that clamps exactly what the per-module walk of 0.2 clamped."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from bnn_adapt.errors import ConfigError, TrainingDiverged
from bnn_adapt.nn.layers import BinaryConv2d, BinaryLinear, BinaryModule, clamp_to_unit_, latent_weights
from bnn_adapt.run import builders, task
from bnn_adapt.run.config import compose
from bnn_adapt.training.module import Classifier


class Small(nn.Module):
    """A binary conv and linear beside fp32 layers; ``nan_at``: the training forward call whose logits are NaN."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.bconv = BinaryConv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.blin = BinaryLinear(4, 3)
        self.flin = nn.Linear(3, 2)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, x):
        logits = self.flin(self.blin(F.hardtanh(self.bn(self.bconv(x))).mean(dim=(2, 3))))
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.nan_at:
                logits = logits * float("nan")
        return logits


def data(n: int = 48) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 3, 6, 6, generator=generator), torch.arange(n) % 2
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def trainer(**kwargs) -> L.Trainer:
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return L.Trainer(**options)


def classifier(model: nn.Module, lr: float = 1e-2) -> Classifier:
    return Classifier(model, num_classes=2, optimizer=lambda params: torch.optim.Adam(params, lr=lr))


# ------------------------------------------------------------------ divergence


def test_a_nan_loss_is_named_by_its_step_at_the_next_check():
    model = Small(nan_at=5)  # 12 steps; checks every 4: after steps 3, 7, 11
    with pytest.raises(TrainingDiverged, match=r"training loss became nan at epoch 0, step 5; lower optimizer.lr"):
        trainer(log_every_n_steps=4).fit(classifier(model), data())
    assert model.calls == 8  # found at step 7's check, within log_every_n_steps of step 5, not at every step


def test_a_nan_at_the_end_of_an_epoch_stops_training_before_validation():
    model = Small(nan_at=15)  # the last step of epoch 1 (8 steps per epoch); checks every 5 steps: 4, 9, 14
    validated = []

    class Validation(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            validated.append(trainer.current_epoch)

    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 15;"):
        trainer(max_epochs=2, log_every_n_steps=5, limit_train_batches=8, callbacks=[Validation()]).fit(
            classifier(model), data(), data(16)
        )
    assert model.calls == 16 and validated == [0] * 4  # epoch 1 never validated its NaN weights


def test_step_loss_logged_on_logging_steps_and_epoch_loss_weighted_by_batch(tmp_path):
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((float(outputs["loss"]), len(batch[1])))

    torch.manual_seed(0)
    module, logged_names = classifier(Small()), []
    log = module.log
    module.log = lambda name, *args, **kwargs: (logged_names.append(name), log(name, *args, **kwargs))
    fit = trainer(
        max_epochs=2, log_every_n_steps=3, logger=CSVLogger(tmp_path, name="csv", version=""), callbacks=[Losses()]
    )
    fit.fit(module, data(46))  # 12 batches per epoch, the last one of 2 images
    # self.log only where Lightning writes: 4 logging steps per epoch; the metric objects also at its first step
    assert [logged_names.count(k) for k in ("train/loss_step", "train/loss_epoch", "train/acc")] == [8, 10, 10]
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}
    assert sorted(logged) == [2, 5, 8, 11, 14, 17, 20, 23]
    for step, value in logged.items():
        assert value == pytest.approx(losses[step][0])
    epoch_means = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    expected = [sum(v * n for v, n in epoch) / sum(n for _, n in epoch) for epoch in (losses[:12], losses[12:])]
    assert epoch_means == pytest.approx(expected, rel=1e-6)
    assert float(fit.callback_metrics["train/loss_epoch"]) == pytest.approx(expected[-1], rel=1e-6)
    assert 0 <= float(fit.callback_metrics["train/acc"]) <= 1


# ------------------------------------------------------------------ clamping


def walk_and_clamp(model: nn.Module) -> None:
    """0.2's clamp_latent_weights, kept here as the reference: every module, every step."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BinaryModule) and module.clamp_latent:
                for name in module.binary_param_names:
                    p = getattr(module, f"{name}_orig", None)
                    if not isinstance(p, nn.Parameter):
                        p = getattr(module, name, None)
                    if isinstance(p, nn.Parameter) and p.requires_grad:
                        p.clamp_(-1.0, 1.0)


def configured_model(name: str) -> nn.Module:
    """The model of ``MODELS[name]`` as a run builds it, its parameters pushed far outside [-1, 1];
    the same every call (seeded)."""
    torch.manual_seed(0)
    cfg = compose(["base.width=0.1", *MODELS[name]])
    model = builders.build_adapted(cfg, builders.build_base(cfg), 5)
    plan = builders.pruning_plan(cfg)
    if plan is not None:  # mid-training state: masks on, latent weights as <name>_orig
        depthwise, pointwise = model.prune_targets()
        for m in depthwise + pointwise:
            prune.l1_unstructured(m, "weight", amount=0.5)
    if name == "full_finetune":  # a pruned binary layer: its latent weight is weight_orig
        prune.l1_unstructured(model.base.stem[0], "weight", amount=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5).add_(torch.randn_like(p) * 3)
    return model


MODELS = {
    **{s: (f"adapter={s}",) for s in ("full_finetune", "head_only", "serial", "udta", "lora", "bitfit")},
    "udta, pruned with head columns": ("adapter=udta", "reduction=prune", "reduction.head_rate=0.5"),
    "udta at 4 bits": ("adapter=udta", "adapter.bits=4"),
    "serial at 2 bits": ("adapter=serial", "adapter.bits=2"),
    "reactnet18 udta": ("base=reactnet18", "base.width=0.0625", "data.image_size=32", "adapter=udta"),
    "reactnet18 finetune": ("base=reactnet18", "base.width=0.0625", "data.image_size=32", "adapter=full_finetune"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_listed_clamp_clamps_what_the_module_walk_clamped(name):
    walked, listed = configured_model(name), configured_model(name)
    walk_and_clamp(walked)
    clamp_to_unit_(latent_weights(listed))
    after_walk, after_list = walked.state_dict(), listed.state_dict()
    assert after_walk.keys() == after_list.keys()
    for key, value in after_walk.items():
        assert torch.equal(value, after_list[key]), key
    clamped = {id(p) for p in latent_weights(listed)}
    trainable_binary = [p for p in listed.parameters() if id(p) in clamped]
    assert all(p.requires_grad and p.detach().abs().max() <= 1 for p in trainable_binary)
    untouched = [p for p in listed.parameters() if id(p) not in clamped]
    assert untouched and all(p.detach().abs().max() > 1 for p in untouched)  # frozen and fp32: left alone
    if name not in ("reactnet18 udta", "reactnet18 finetune", "bitfit", "lora"):
        assert trainable_binary  # the STE head's binary linear trains in every strategy but bitfit and lora


def test_the_clamp_list_follows_what_trains_from_epoch_to_epoch():
    torch.manual_seed(1)
    model = Small()

    class FreezeAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                model.bconv.weight.requires_grad_(False)
                with torch.no_grad():
                    model.bconv.weight.fill_(5.0)  # frozen from now on: never clamped again

    module = classifier(model, lr=10.0)
    trainer(max_epochs=2, callbacks=[FreezeAfterFirstEpoch()]).fit(module, data(16))
    assert torch.equal(model.bconv.weight.detach(), torch.full_like(model.bconv.weight, 5.0))
    assert module.latent == [model.blin.weight, model.blin.bias]
    assert all(p.detach().abs().max() <= 1 for p in module.latent)


# ------------------------------------------------------------------ trainer.compile


def test_trainer_compile_trains_with_the_same_files(make_cfg, pretrained_base):
    """aot_eager traces forward and backward as inductor does (without generating code): the run
    finishes and its checkpoint keeps the uncompiled keys (nn.Module.compile works in place)."""
    cfg = make_cfg("data=cifar5_5", "adapter=udta", "trainer.compile=aot_eager", "trainer.max_epochs=2")
    metrics = task.run(cfg)
    assert metrics["status"] == "complete" and metrics["epochs_run"] == 2 and metrics["config_hash"]
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not any("_orig_mod" in k for k in state)


def test_trainer_compile_errors_name_the_key(make_cfg, pretrained_base):
    with pytest.raises(ConfigError, match=r"trainer.compile='fast' is not a torch.compile backend; use true, false"):
        task.run(make_cfg("data=cifar5_5", "adapter=udta", "trainer.compile=fast", name="bad_value"))

    @torch._dynamo.register_backend
    def without_compiler_for_tests(graph, example_inputs):  # as inductor fails on a machine without a C++ compiler
        raise RuntimeError("no C++ compiler found")

    with pytest.raises(
        ConfigError,
        match=r"trainer.compile=without_compiler_for_tests: torch.compile failed "
        r"\(RuntimeError: no C\+\+ compiler found\); set trainer.compile=false",
    ):
        task.run(
            make_cfg(
                "data=cifar5_5", "adapter=udta", "trainer.compile=without_compiler_for_tests", name="failing_backend"
            )
        )


@pytest.mark.integration
def test_trainer_compile_true_runs_inductor_on_cpu(make_cfg, pretrained_base):
    """The default backend generates C++ on CPU: the smallest graph (a head on cached features) keeps it short."""
    cfg = make_cfg(
        "data=cifar5_5", "adapter=head_only", "tap_cache.enabled=true", "trainer.compile=true", "trainer.max_epochs=2"
    )
    assert task.run(cfg)["epochs_run"] == 2
