"""The future-work adapters: LoRA branches beside binary convs and
BitFit (BN affine, learnable biases, PReLU), on both bases: counts, maths,
an untouched base, and end-to-end runs through ``task.run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bnn_adapt.accounting import summarize
from bnn_adapt.adapters import BitFit, LoRA
from bnn_adapt.adapters.bitfit import bitfit_parameter_names
from bnn_adapt.adapters.file import attach_adapter
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.errors import ConfigError
from bnn_adapt.run import builders, task
from tests.helpers.models import randomize_bn

BASES = {
    "ste": (lambda: STEResNetCIFAR(num_classes=5, width=0.1), 32),
    "reactnet": (lambda: ReActNet18(num_classes=10, width=0.125), 64),
}


def ste_convs(w: float = 1.0) -> dict[int, list[tuple[int, int, int]]]:
    """(c_in, c_out, kernel) of every binary conv per stage of the STE ResNet, stem excluded."""
    c1, c2, c3 = (max(1, int(round(c * w))) for c in (80, 160, 320))
    return {
        1: [(c1, c1, 3)] * 4,
        2: [(c1, c2, 3), (c2, c2, 3), (c2, c2, 3), (c2, c2, 3), (c1, c2, 1)],
        3: [(c2, c3, 3), (c3, c3, 3), (c3, c3, 3), (c3, c3, 3), (c2, c3, 1)],
    }


def reactnet_convs(w: float = 1.0) -> dict[int, list[tuple[int, int, int]]]:
    """One binary 3x3 conv per block, 4 blocks per stage (ReActNet-18)."""
    ch = [max(1, int(round(c * w))) for c in (64, 128, 256, 512)]
    return {s + 1: [(ch[s - 1] if s else ch[0], ch[s], 3)] + [(ch[s], ch[s], 3)] * 3 for s in range(4)}


def lora_formula(convs: dict, stages, rank: int) -> int:
    """``r * (c_in * k * k + c_out)`` per adapted binary conv."""
    return sum(rank * (ci * k * k + co) for s in stages for ci, co, k in convs[s])


def base_state(base: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in base.state_dict().items()}


# ------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("name", list(BASES))
def test_lora_starts_at_the_base_and_leaves_it_untouched(name):
    make, size = BASES[name]
    torch.manual_seed(0)
    base = make()
    randomize_bn(base)
    base.eval()
    before = base_state(base)
    model = LoRA(base, num_classes=3, rank=2).eval()
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected = model.head(base.pre_classifier(base.stage_outputs(x)[-1]))
        # the up projections start at zero: exactly the frozen base's features
        assert torch.equal(model(x), expected)
        for branch in model.adapter.branches.values():
            nn.init.normal_(branch.up.weight, std=0.5)
        changed = model(x)
    assert not torch.allclose(changed, expected), "the LoRA branches had no effect"
    # the base: no hook left behind, same state dict (keys and values), all frozen
    assert all(not m._forward_hooks for m in base.modules())
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize(("name", "stages"), [("ste", None), ("ste", [3]), ("reactnet", None), ("reactnet", [2, 4])])
def test_lora_counts_follow_the_formula(name, stages):
    make, _ = BASES[name]
    base = make()
    convs = ste_convs(0.1) if name == "ste" else reactnet_convs(0.125)
    model = LoRA(base, num_classes=3, rank=3, stages=stages)
    chosen = stages or list(convs)
    s = summarize(model)
    assert s["adapter_fp32_params"] == lora_formula(convs, chosen, 3)
    assert s["adapter_binary_params"] == 0
    assert len(model.adapter.targets) == sum(len(convs[st]) for st in chosen)


def test_lora_gradients_reach_only_the_branches_of_chosen_stages():
    torch.manual_seed(0)
    base = STEResNetCIFAR(num_classes=5, width=0.1)
    model = LoRA(base, num_classes=3, rank=2, stages=[2, 3]).train()
    for branch in model.adapter.branches.values():
        nn.init.normal_(branch.up.weight, std=0.1)
    nn.functional.cross_entropy(model(torch.randn(6, 3, 32, 32)), torch.arange(6) % 3).backward()
    assert all(not t.startswith("stages.0.") for t in model.adapter.targets)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.parameters())
    assert all(p.grad is None for p in base.parameters())


def test_lora_rejects_bad_rank_and_stages():
    base = STEResNetCIFAR(num_classes=5, width=0.1)
    with pytest.raises(ConfigError, match="adapter.rank"):
        LoRA(base, 3, rank=0)
    with pytest.raises(ConfigError, match="stages 1..3"):
        LoRA(base, 3, stages=[4])


# ------------------------------------------------------------------ BitFit


def test_bitfit_trains_bn_biases_and_prelu_only():
    base = ReActNet18(num_classes=10, width=0.125)
    names = set(bitfit_parameter_names(base))
    modules = dict(base.named_modules())
    # BN affine, learnable biases (move0/1/2), PReLU slopes; never a conv or the classifier
    assert {type(modules[n.rpartition(".")[0]]).__name__ for n in names} == {"BatchNorm2d", "LearnableBias", "PReLU"}
    assert all(not n.startswith("classifier.") for n in names)
    assert all("binary_conv" not in n and "conv1" not in n for n in names)
    some = {"stem.bn1.weight", "stages.1.0.downsample.2.bias", "stages.0.0.move0.bias", "stages.3.3.prelu.weight"}
    assert some <= names


def test_bitfit_counts_at_full_width():
    """STE ResNet / ReActNet-18 channel plans: every base BN (gamma, beta) + learnable biases + PReLU, classifier excluded."""
    ste = summarize(BitFit(STEResNetCIFAR(num_classes=10, width=1.0), 5))
    bn_channels = 80 + 4 * 80 + (4 * 160 + 160) + (4 * 320 + 320)  # stem, stage 1-3 (+ shortcut BN)
    assert ste["adapter_fp32_params"] == 2 * bn_channels + 2 * 320  # + the pre-classifier BN1d(320)
    react = summarize(BitFit(ReActNet18(num_classes=1000, width=1.0), 5))
    block_out = 4 * (64 + 128 + 256 + 512)
    block_in = (64 + 3 * 64) + (64 + 3 * 128) + (128 + 3 * 256) + (256 + 3 * 512)
    bn = 64 + block_out + (128 + 256 + 512)  # stem, one per block, downsample BNs
    assert react["adapter_fp32_params"] == 2 * bn + block_in + 2 * block_out + block_out  # move0, move1+2, PReLU
    assert ste["adapter_binary_params"] == react["adapter_binary_params"] == 0


@pytest.mark.parametrize("name", list(BASES))
def test_bitfit_trains_a_copy_and_never_the_base(name):
    make, size = BASES[name]
    torch.manual_seed(0)
    base = make()
    randomize_bn(base)
    before = base_state(base)
    model = BitFit(base, num_classes=3)
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model.head(base.pre_classifier(base.stage_outputs(x)[-1])))
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(8) % 3).backward()
        optimizer.step()
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BitFit changed the stored base"
    copies = model.adapter.overrides()
    assert any(not torch.equal(copies[n], before[n]) for n in copies), "the BitFit copies did not train"
    with torch.no_grad():
        model.eval()
        assert not torch.equal(model(x), model.head(base.pre_classifier(base.stage_outputs(x)[-1])))


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize(("adapter", "extra"), [("lora", ["adapter.rank=2", "adapter.stages=[2,3]"]), ("bitfit", [])])
def test_adapt_end_to_end(adapter, extra, pretrained_base, make_cfg):
    cfg = make_cfg("data=cifar5_5", f"adapter={adapter}", *extra)
    metrics = task.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["strategy"] == adapter and 0.0 <= on_disk["test_top1"] <= 1.0
    if adapter == "lora":
        expected = lora_formula(ste_convs(0.1), [2, 3], 2)
    else:
        expected = 2 * (8 + 4 * 8 + 5 * 16 + 5 * 32) + 2 * 32  # width 0.1: 8/16/32 channels
    assert metrics["adapter_fp32_params"] == on_disk["adapter_fp32_params"] == expected
    assert metrics["adapter_binary_params"] == 0
    records = attach_adapter(run_dir / "adapter.safetensors", builders.load_trained_base(cfg)).meta["records"]
    assert sum(r["bytes"] for k, r in records.items() if k.startswith("adapter.")) == 4 * expected  # fp32 each
    # the frozen base is bit-identical in the checkpoint
    stored = torch.load(pretrained_base["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(stored[k], ckpt["model.base." + k]) for k in stored)
    # summary_only reports the same counts without training
    summary = task.run(make_cfg("data=cifar5_5", f"adapter={adapter}", *extra, "summary_only=true", name="summary"))
    assert summary["adapter_fp32_params"] == expected and summary["size_pct"] == pytest.approx(metrics["size_pct"])
