"""Precise BN (issue #22): BN statistics re-estimated with the final weights after pretraining (the last
epoch and the best one), optionally before every validation, and ``base.bn=recalibrate`` (AdaBN) for
adaptation; everything downstream (tap cache, adapter file, packed export) uses the re-estimated ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bnn_adapt.adapters.file import ADAPTER_FILE, attach_adapter, stored_tensors
from bnn_adapt.bases import STEResNetCIFAR, load_base
from bnn_adapt.bases.checkpoint import best_epoch_path
from bnn_adapt.deploy.export import BASE_FILE
from bnn_adapt.deploy.packed_base import read_packed_base
from bnn_adapt.errors import ConfigError
from bnn_adapt.nn.layers import clamp_latent_weights
from bnn_adapt.run import builders, task
from bnn_adapt.training import precise_bn as pbn
from bnn_adapt.training.precise_bn import bn_statistics, precise_bn, recalibrate, top1

# ------------------------------------------------------------------ the function, without Lightning


def patterned(n: int, patterns: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a +-1 pattern of 4x4-pixel blocks under noise: learnable in a few steps."""
    labels = torch.randint(len(patterns), (n,), generator=generator)
    signal = patterns[labels].repeat_interleave(4, 2).repeat_interleave(4, 3)
    return torch.randn(n, 3, 32, 32, generator=generator) + signal, labels


def test_precise_bn_restores_the_eval_accuracy_of_stale_statistics():
    """A BNN trained, then 3 steps at a 10x higher learning rate: the momentum statistics (0.1) still
    describe the weights before them. Precise BN brings eval-mode accuracy back to train mode's."""
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(2)
    patterns = torch.randn(5, 3, 8, 8).sign()
    train = [patterned(32, patterns, generator) for _ in range(10)]
    held_out = [patterned(64, patterns, generator) for _ in range(4)]
    net = STEResNetCIFAR(num_classes=5, width=0.1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    def step(images, labels):
        net.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
        clamp_latent_weights(net)

    for _ in range(2):
        for images, labels in train:
            step(images, labels)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    for images, labels in train[:3]:
        step(images, labels)

    batch_statistics = copy.deepcopy(net).train()  # train mode: each batch normalised by its own statistics
    with torch.no_grad():
        train_mode = sum(float((batch_statistics(x).argmax(1) == y).float().mean()) for x, y in held_out) / 4
    stale = top1(net, held_out)
    parameters = {k: v.clone() for k, v in net.named_parameters()}
    assert precise_bn(net, train) == len(train)
    precise = top1(net, held_out)
    assert stale < train_mode - 0.1, (stale, train_mode)  # the premise: the stored statistics are stale
    assert precise >= train_mode - 0.03, (precise, train_mode)
    assert all(torch.equal(p, parameters[k]) for k, p in net.named_parameters())


def small_fp32_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
        nn.BatchNorm1d(4),
    )


def test_precise_bn_is_a_no_op_on_a_converged_fp32_net_whose_statistics_are_exact():
    """Weights that no longer move and the data they trained on: after 300 train-mode passes the momentum
    statistics are that data's own; re-estimating them changes nothing beyond float rounding, and leaves
    modes, momenta and parameters as they were."""
    torch.manual_seed(0)
    net = small_fp32_net()
    batch = torch.randn(32, 3, 16, 16) * 2 + 1
    net.train()
    with torch.no_grad():
        for _ in range(300):
            net(batch)
    before = bn_statistics(net)
    parameters = copy.deepcopy(net.state_dict())
    net.eval()
    net[2].train()  # a mixed-mode model: each module's own mode comes back
    with torch.no_grad():
        outputs = net(batch)
    assert precise_bn(net, [batch, batch, batch]) == 3
    after = bn_statistics(net)
    for name, value in before.items():
        if not name.endswith("num_batches_tracked"):
            assert torch.allclose(after[name], value, rtol=1e-5, atol=1e-6), name
    with torch.no_grad():
        assert torch.allclose(net(batch), outputs, rtol=1e-5, atol=1e-5)
    assert [m.training for m in net] == [i == 2 for i in range(len(net))]
    assert all(m.momentum == 0.1 for m in pbn.batch_norms(net))
    assert all(torch.equal(p, parameters[k]) for k, p in net.named_parameters())


def test_precise_bn_without_batches_is_refused_and_changes_nothing():
    net = small_fp32_net()
    before = bn_statistics(net)
    with pytest.raises(ValueError, match="no batches"):
        precise_bn(net, [])
    assert all(torch.equal(v, bn_statistics(net)[k]) for k, v in before.items())


# ------------------------------------------------------------------ after pretraining


def evaluate(cfg, split: str, network: nn.Module) -> float:
    """Top-1 of ``network`` on the run's evaluation batches (``limit_val_batches`` of them)."""
    datamodule = builders.build_datamodule(cfg, split)
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader())[: cfg.trainer.limit_val_batches]
    return top1(network, batches)


def re_estimated(cfg, state_dict: dict, epoch: int) -> dict[str, torch.Tensor]:
    """The BN statistics precise BN gives the base of ``state_dict`` in the pretraining run of ``cfg``
    at ``epoch`` (its loader's order that epoch, the pass's own seed)."""
    base = builders.build_base(cfg)
    base.load_state_dict(state_dict)
    datamodule = builders.build_datamodule(cfg, "base")
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    sampler = loader.sampler if hasattr(loader.sampler, "set_epoch") else loader.batch_sampler.sampler
    sampler.set_epoch(epoch)  # where Lightning sets it: the tensor loader's shuffle sits under its batches
    with pbn._own_random_stream(torch.device("cpu")):
        precise_bn(base, pbn.rounds(loader), cfg.base.precise_bn.batches)
    return bn_statistics(base)


def pretrain(make_cfg, tmp_path, *overrides: str, name: str):
    cfg = make_cfg(
        "data=cifar5_5",
        "task=pretrain",
        "adapter=full_finetune",
        "trainer.max_epochs=3",
        *overrides,
        name=name,
        base_dir=tmp_path / name,
    )
    return cfg, task.run(cfg)


def test_pretraining_saves_re_estimated_statistics_and_reports_both_top1(make_cfg, tmp_path):
    cfg, metrics = pretrain(make_cfg, tmp_path, name="pretrain")
    last = metrics["history"][-1]
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["test_top1_averaged_bn"] == last["val/acc"]  # the per-epoch curve: averaged statistics
    assert on_disk["test_top1_precise_bn"] == last["val/acc_precise_bn"] == on_disk["test_top1"]
    assert all(pbn.PRECISE_KEY not in h for h in metrics["history"][:-1])

    # the saved base holds the statistics precise BN computes for its weights, and scores the precise top-1
    saved = torch.load(cfg.base.save_to, weights_only=False)
    expected = re_estimated(cfg, saved["state_dict"], epoch=2)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in expected.items())
    base = load_base("ste_resnet_cifar", cfg.base.save_to, "unused")
    assert evaluate(cfg, "base", base) == pytest.approx(metrics["test_top1_precise_bn"], abs=1e-6)
    # Lightning's own checkpoint (what resume=true continues from) kept the averaged statistics
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    averaged = {k.removeprefix("model."): v for k, v in state.items()}
    assert any(not torch.equal(averaged[k], expected[k]) for k in expected if k.endswith("running_mean"))
    base.load_state_dict(averaged)
    assert evaluate(cfg, "base", base) == pytest.approx(metrics["test_top1_averaged_bn"], abs=1e-6)

    # the best epoch (chosen by the averaged curve) gets statistics re-estimated for its own weights
    best = torch.load(best_epoch_path(cfg.base.save_to), weights_only=False)
    assert best["epoch"] == metrics["best_epoch"] and best["top1"] == max(h["val/acc"] for h in metrics["history"])
    expected = re_estimated(cfg, best["state_dict"], epoch=2)
    assert all(torch.equal(best["state_dict"][k], v) for k, v in expected.items())
    base = load_base("ste_resnet_cifar", best_epoch_path(cfg.base.save_to), "unused")
    assert evaluate(cfg, "base", base) == pytest.approx(best["top1_precise_bn"], abs=1e-6)
    assert metrics["best_epoch_top1_precise_bn"] == best["top1_precise_bn"]


def test_every_epoch_changes_only_what_validation_measures(make_cfg, tmp_path):
    """Off, after training, before every validation: the same trained weights, the same final base and
    top-1; with every_epoch the per-epoch curve is the re-estimated one and the averaged one goes beside
    it at the last epoch, as it was without."""
    runs = {
        mode: pretrain(make_cfg, tmp_path, *overrides, name=mode)
        for mode, overrides in {
            "off": ["base.precise_bn.enabled=false"],
            "last": [],
            "every": ["base.precise_bn.every_epoch=true"],
        }.items()
    }
    saved = {mode: torch.load(cfg.base.save_to, weights_only=False)["state_dict"] for mode, (cfg, _) in runs.items()}
    statistics = set(bn_statistics(builders.build_base(runs["off"][0])))
    for key, value in saved["off"].items():
        if key not in statistics:
            assert torch.equal(saved["last"][key], value) and torch.equal(saved["every"][key], value), key
    assert all(torch.equal(saved["last"][k], v) for k, v in saved["every"].items())
    off, last, every = (runs[m][1] for m in ("off", "last", "every"))
    assert [h["val/acc"] for h in off["history"]] == [h["val/acc"] for h in last["history"]]
    assert "test_top1_precise_bn" not in off and off["test_top1"] == off["history"][-1]["val/acc"]
    assert every["test_top1"] == last["test_top1"] == last["test_top1_precise_bn"] == every["history"][-1]["val/acc"]
    assert every["test_top1_averaged_bn"] == last["test_top1_averaged_bn"] == off["test_top1"]
    first_epochs = [h["val/loss"] for h in every["history"][:-1]]
    assert first_epochs != [h["val/loss"] for h in last["history"][:-1]]  # measured with other statistics
    # every epoch's stored best is already re-estimated: its top-1 is the one it was chosen by
    assert every["best_epoch_top1_precise_bn"] == max(h["val/acc"] for h in every["history"])


def test_precise_bn_settings_are_checked(make_cfg):
    with pytest.raises(ConfigError, match=r"base\.precise_bn\.batches=0 is invalid"):
        task.run(make_cfg("task=pretrain", "base.precise_bn.batches=0"))
    with pytest.raises(ConfigError, match="base.bn='drift' is invalid: use one of frozen, recalibrate, adapt"):
        task.run(make_cfg("base.bn=drift"))


# ------------------------------------------------------------------ base.bn=recalibrate (AdaBN)


def test_recalibrate_changes_only_the_base_bn_statistics(pretrained_base, make_cfg):
    cfg = make_cfg("data=cifar5_5", "adapter=udta", "base.bn=recalibrate")
    model = builders.build_adapted(cfg, builders.load_trained_base(cfg), 5)
    before = copy.deepcopy(model.state_dict())
    datamodule = builders.build_datamodule(cfg, "target")
    assert recalibrate(model.base, datamodule, 5, torch.device("cpu")) == 5
    after = model.state_dict()
    statistics = {f"base.{k}" for k in bn_statistics(model.base)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= statistics, sorted(changed - statistics)
    assert any(k.endswith("running_mean") for k in changed)
    model.train()
    assert not any(m.training for m in model.base.modules())  # then kept frozen, as base.bn=frozen


def test_recalibrated_base_feeds_the_tap_cache_and_the_export(pretrained_base, make_cfg, tmp_path):
    """A run with base.bn=recalibrate trains from the recalibrated statistics with or without a tap cache
    (same history); its base changed only in them; its adapter file carries them, and the packed export
    reproduces its top-1."""
    common = ("data=cifar5_5", "adapter=udta", "data.augment=false", "trainer.max_epochs=2")
    frozen = task.run(make_cfg(*common, name="frozen"))
    plain_cfg = make_cfg(*common, "base.bn=recalibrate", name="plain")
    plain = task.run(plain_cfg)
    cached = task.run(make_cfg(*common, "base.bn=recalibrate", "tap_cache.enabled=true", name="cached"))
    assert plain["history"] == cached["history"] and plain["test_top1"] == cached["test_top1"]
    assert plain["history"] != frozen["history"]

    stored = torch.load(pretrained_base["checkpoint"], weights_only=False)["state_dict"]
    run_dir = Path(plain_cfg.paths.output_dir)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    base = {k.removeprefix("model.base."): v for k, v in state.items() if k.startswith("model.base.")}
    changed = {k for k in stored if not torch.equal(stored[k], base[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    saved = stored_tensors(run_dir / ADAPTER_FILE, builders.load_trained_base(plain_cfg))
    assert any(k.startswith("base.") for k in saved)  # the recalibrated statistics travel with the adapter

    out = tmp_path / "export"
    task.run(make_cfg("task=export", f"export.adapter_run=[{run_dir}]", f"export.dir={out}", name="export"))
    packed, _ = read_packed_base(out / BASE_FILE)
    adapter = attach_adapter(next(p for p in out.glob("*.safetensors")), packed)
    assert evaluate(plain_cfg, "target", adapter) == pytest.approx(plain["test_top1"], abs=1e-6)


# ------------------------------------------------------------------ at the end of an adaptation


@pytest.mark.parametrize(
    ("overrides", "trained"),
    [
        (["adapter=head_only"], {"head"}),  # the STE head is binary: BinaryLinear + BatchNorm1d
        (["adapter=lora"], {"head"}),
        (["adapter=udta"], {"adapter", "head"}),  # + the thin blocks' own BNs
        (["adapter=udta", "base.bn=recalibrate"], {"adapter", "head"}),
        (["adapter=udta", "base.bn=adapt"], {"adapter", "base", "head"}),  # the thesis's drift
        (["adapter=full_finetune"], {"base", "head"}),
    ],
)
def test_trained_norms_are_the_bns_whose_statistics_the_adaptation_updates(
    pretrained_base, make_cfg, overrides, trained
):
    cfg = make_cfg("data=cifar5_5", *overrides)
    model = builders.build_adapted(cfg, builders.load_trained_base(cfg), 5)
    names = {id(m): n for n, m in model.named_modules()}
    model.eval()
    found = pbn.trained_norms(model)
    assert {names[id(m)].split(".")[0] for m in found} == trained
    assert not any(m.training for m in model.modules())  # the modes are left as they were
    with torch.no_grad():  # the rule is the model's own: exactly the BNs whose buffers a training forward moves
        before = copy.deepcopy(model.state_dict())
        model.train()
        model(torch.randn(4, 3, 32, 32))
        moved = {k.rpartition(".")[0] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert moved <= {names[id(m)] for m in found}
    assert {names[id(m)] for m in found} - moved <= {"base.classifier.1"}  # the base's own head, replaced


def test_precise_bn_leaves_a_bn_the_forward_does_not_reach_as_it_was():
    unused = nn.BatchNorm1d(3)
    unused.running_mean.fill_(2.0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.add_module("unused", unused)
    model.forward = lambda x: model[1](model[0](x))
    assert precise_bn(model, [torch.randn(2, 3, 8, 8)]) == 1
    assert torch.all(unused.running_mean == 2.0) and int(unused.num_batches_tracked) == 0
    assert int(model[1].num_batches_tracked) == 1


def adapt(make_cfg, *overrides: str, name: str):
    cfg = make_cfg("data=cifar5_5", "trainer.max_epochs=2", *overrides, name=name)
    return cfg, task.run(cfg)


@pytest.mark.parametrize("adapter", ["full_finetune", "udta"])
def test_adaptation_re_estimates_the_statistics_it_trains_and_only_those(pretrained_base, make_cfg, adapter, tmp_path):
    """Off and on: the same training; on, the last validation measures both statistics, the run leaves with
    the re-estimated ones of its trained BNs (a frozen base's stay the stored ones), its adapter file
    carries them and the packed export scores the headline top-1."""
    _, off = adapt(make_cfg, f"adapter={adapter}", "base.precise_bn.adaptation=false", name=f"{adapter}_off")
    cfg, on = adapt(make_cfg, f"adapter={adapter}", name=f"{adapter}_on")
    assert [h["val/acc"] for h in on["history"]] == [h["val/acc"] for h in off["history"]]
    assert "test_top1_precise_bn" not in off and off["test_top1"] == off["history"][-1]["val/acc"]
    assert on["test_top1_averaged_bn"] == off["test_top1"]
    assert on["test_top1"] == on["test_top1_precise_bn"] == on["history"][-1][pbn.PRECISE_KEY]

    run_dir = Path(cfg.paths.output_dir)
    averaged = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    model = builders.build_adapted(cfg, builders.load_trained_base(cfg), 5)
    model.load_state_dict({k.removeprefix("model."): v for k, v in averaged.items()})
    assert evaluate(cfg, "target", model) == pytest.approx(on["test_top1_averaged_bn"], abs=1e-6)

    out = tmp_path / f"{adapter}_export"
    task.run(make_cfg("task=export", f"export.adapter_run=[{run_dir}]", f"export.dir={out}", name=f"{adapter}_export"))
    packed, _ = read_packed_base(out / BASE_FILE)
    exported = attach_adapter(next(out.glob("*.safetensors")), packed)
    assert evaluate(cfg, "target", exported) == pytest.approx(on["test_top1"], abs=1e-6)
    saved = stored_tensors(run_dir / ADAPTER_FILE, builders.load_trained_base(cfg))
    assert any(k.startswith("base.") for k in saved) == (adapter == "full_finetune")  # base.bn=frozen: untouched
    assert on["test_top1"] != on["test_top1_averaged_bn"] or adapter == "udta"  # finetuning's statistics moved


def test_adaptation_without_trained_bns_gets_no_precise_bn_pass(make_cfg):
    cfg = make_cfg("data=cifar5_5")
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval().requires_grad_(False))
    frozen.train = lambda mode=True: frozen  # a model whose train() keeps its only BN in eval mode
    assert pbn.trained_norms(frozen) == [] and task.precise_bn_callback(cfg, frozen) is None
    assert task.precise_bn_callback(cfg, nn.Sequential(nn.BatchNorm2d(4))).only_trained
