"""Adapters below 32 bits (issue #13): the per-channel quantizer, quantised layers in every strategy,
counts at real bits, exact BN folding, adapter files at the trained width that load to identical
predictions, and the runs, tables and search that carry ``adapter.bits``."""

from __future__ import annotations

import copy
import json
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.accounting import layer_table, parameter_rows, summarize, totals
from bnn_adapt.adapters import STRATEGIES, Parallel, Serial
from bnn_adapt.adapters.bitfit import substituted
from bnn_adapt.adapters.file import ADAPTER_FILE, attach_adapter, export_adapter, stored_tensors
from bnn_adapt.bases.fingerprint import fold_norms
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.deploy.export import BASE_FILE
from bnn_adapt.deploy.packed_base import pack_base, read_packed_base, repack
from bnn_adapt.errors import ConfigError
from bnn_adapt.nn.folding import fma32, fold_batch_norm, is_folded, load_folded, sign_threshold
from bnn_adapt.nn.layers import BinaryLinear, QuantConv2d, QuantLinear, quantize_weights
from bnn_adapt.nn.quantizers import BITS, ChannelQuantizer, dequantize
from bnn_adapt.run import builders, task
from bnn_adapt.run.config import compose, without_hydra_node
from bnn_adapt.run.labels import run_label
from bnn_adapt.run.results import config_hash
from bnn_adapt.search.pareto import compare_fronts, hypervolume
from bnn_adapt.training.pruning import PruningPlan
from tests.helpers.models import BASES, adapted, make_base

LOW = [b for b in BITS if b != 32]
TRAINED = [s for s in STRATEGIES if s != "full_finetune"]  # every strategy that takes adapter.bits


# ------------------------------------------------------------------ the quantizer


@pytest.mark.parametrize("bits", LOW)
def test_codes_are_integers_within_the_width_with_one_scale_per_output_channel(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    w[2] = 0.0  # a whole pruned filter
    w[0, 0, 0, 0] = 0.0  # one pruned weight
    codes, scale = ChannelQuantizer(bits).encode(w)
    levels = max(1, 2 ** (bits - 1) - 1)
    assert scale.shape == (6,) and scale.dtype == torch.float32
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= levels
    assert codes[2].eq(0).all() and scale[2] == 0 and codes[0, 0, 0, 0] == 0  # pruned weights stay exactly zero
    if bits == 1:  # sign x mean |W| of the kept weights (XNOR-Net)
        assert torch.equal(codes[1], torch.sign(w[1]))
        assert scale[0] == pytest.approx(float(w[0].abs().sum() / (w[0] != 0).sum()), rel=1e-6)
    else:  # the largest magnitude reaches the top code
        assert (codes.flatten(1).abs().amax(1)[[0, 1, 3, 4, 5]] == levels).all()
    q = ChannelQuantizer(bits)(w)
    assert torch.equal(q, dequantize(codes, scale))


def test_more_bits_quantise_closer():
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    errors = [float((ChannelQuantizer(b)(w) - w).pow(2).mean()) for b in (1, 2, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-8 * float(w.pow(2).mean()) * 1e3


def test_two_bits_pick_a_clipping_scale_not_the_maximum():
    """Ternary weights scaled to the channel's max would zero nearly everything; the searched scale does not."""
    torch.manual_seed(2)
    w = torch.randn(16, 288)
    codes, scale = ChannelQuantizer(2).encode(w)
    naive = w.abs().amax(dim=1)  # max |W| / L with L = 1
    assert (scale < naive).all() and float((codes != 0).float().mean()) > 0.3


def test_gradient_passes_straight_through():
    w = torch.randn(4, 8, requires_grad=True)
    upstream = torch.randn(4, 8)
    ChannelQuantizer(2)(w).backward(upstream)
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("bits", LOW)
def test_a_stored_quantizer_recovers_the_codes_exactly(bits):
    """A weight loaded from a file holds scale * code: encoding it again gives the same codes and scales."""
    torch.manual_seed(3)
    w = torch.randn(8, 27) * 0.1
    codes, scale = ChannelQuantizer(bits).encode(w)
    stored = ChannelQuantizer(bits, scale=scale)
    q = dequantize(codes, scale)
    again = stored.encode(q)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scale) and stored(q) is q


@pytest.mark.parametrize("bits", [0, 3, 64, "4", True])
def test_unsupported_widths_are_one_clear_error(bits):
    with pytest.raises(ConfigError, match=r"adapter.bits=.* is invalid: use one of 32, 16, 8, 4, 2, 1"):
        ChannelQuantizer(bits)


# ------------------------------------------------------------------ quantised layers in the strategies


def test_only_plain_fp32_convs_and_linears_are_quantised_and_keep_their_parameters():
    conv, linear = nn.Conv2d(4, 8, 3), nn.Linear(8, 3)
    binary = BinaryLinear(8, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(8), binary, linear)
    out = quantize_weights(model, 4)
    assert out is model
    assert isinstance(model[0], QuantConv2d) and model[0].weight is conv.weight and model[0].bias is conv.bias
    assert isinstance(model[3], QuantLinear) and model[3].weight is linear.weight
    assert model[2] is binary and type(model[1]) is nn.BatchNorm2d
    assert quantize_weights(nn.Linear(2, 2), 32).__class__ is nn.Linear
    assert isinstance(quantize_weights(nn.Linear(4, 2), 8), QuantLinear)  # a bare layer is replaced
    # rows of one weight (a pointwise conv with as many groups as inputs) would cost more with a scale each
    assert type(quantize_weights(nn.Conv2d(8, 16, 1, groups=8), 1)) is nn.Conv2d


@pytest.mark.parametrize("strategy", TRAINED)
@pytest.mark.parametrize("name", list(BASES))
def test_every_strategy_trains_its_weights_at_the_configured_bits(strategy, name):
    base, size = make_base(name)
    model = STRATEGIES[strategy](base, num_classes=3, bits=4)
    assert model.options["bits"] == 4 and model.bits == 4
    quantised = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    introduced = [m for part in model.introduced_modules().values() for p in part for m in p.modules()]
    assert all(any(m is q for q in introduced) for m in quantised)  # nothing of the base is quantised
    fp32_head = name == "reactnet"  # the STE head is binary already
    expect = strategy in ("serial", "udta", "lora") or fp32_head
    assert bool(quantised) == expect
    model.train()
    x = torch.randn(4, 3, size, size)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()  # (a sum of BN outputs has no gradient)
    assert all(m.weight.grad is not None for m in quantised)
    # LoRA's down-projections see no gradient while their zero-initialised up-projections are zero
    moving = [m for m in quantised if m.weight.grad.abs().sum() > 0]
    assert len(moving) >= (len(quantised) // 2 if strategy == "lora" else len(quantised))


def test_full_finetuning_refuses_bits_below_32():
    with pytest.raises(ConfigError, match="full_finetune.*adapter.bits=32"):
        STRATEGIES["full_finetune"](make_base("ste")[0], num_classes=3, bits=8)


# ------------------------------------------------------------------ counts at real bits


def test_serial_counts_by_hand_at_four_bits():
    base = STEResNetCIFAR(num_classes=10, width=0.1)  # 8/16/32 channels
    model = Serial(base, 3, stages=[1, 2, 3], groups=2, bits=4)
    s = summarize(model)
    weights = sum(c * c // 2 for c in (8, 16, 32))
    bn = sum(4 * c for c in (8, 16, 32))
    scales = 8 + 16 + 32
    assert s["adapter_quantized_params"] == weights and s["adapter_fp32_params"] == bn + scales
    assert s["weight_bits"] == 4
    head_bits = 32 * 3 + 3 + 2 * 3 * 32  # binary linear (+ its bias, binary) + BN1d
    assert s["introduced_bits"] == 4 * weights + 32 * (bn + scales) + head_bits
    base_fp32, base_bin = totals(parameter_rows(base))
    assert s["size_pct"] == pytest.approx(100 * s["introduced_bits"] / (32 * base_fp32 + base_bin), rel=1e-12)
    table = layer_table(model)
    assert "adapter.3.pointwise.weight" in table and "4-bit" in table and "adapter.3.pointwise.weight_scale" in table
    assert f"{s['introduced_bits']:,} bits" in table


def test_pruned_weights_count_their_non_zero_codes_and_live_channels():
    torch.manual_seed(4)
    model = Parallel(STEResNetCIFAR(num_classes=10, width=0.1), 3, head="adapter", bits=2)
    PruningPlan(0.5, 0.9, (1,)).apply(model)
    depthwise, pointwise = model.prune_targets()
    rows = {r.name: r for r in parameter_rows(model.adapter, pruned=depthwise + pointwise)}
    for k, block in enumerate(model.adapter.blocks):
        for conv in ("depthwise", "pointwise"):
            layer = getattr(block, conv)
            codes, _ = layer.weight_quantizer.encode(layer.weight)
            assert rows[f"blocks.{k}.{conv}.weight"].params == int(codes.count_nonzero())
            assert rows[f"blocks.{k}.{conv}.weight"].width == 2
            live = int((layer.weight.flatten(1) != 0).any(dim=1).sum())
            assert rows[f"blocks.{k}.{conv}.weight_scale"].params == live
        assert rows[f"blocks.{k}.depthwise.weight_scale"].params < block.depthwise.weight.shape[0]


def test_bits_shrink_the_size_and_never_the_binary_or_bn_counts():
    sizes = {}
    for bits in BITS:
        s = summarize(Parallel(STEResNetCIFAR(num_classes=10, width=0.25), 5, bits=bits))
        sizes[bits] = s["size_pct"]
        assert s["introduced_binary_params"] == 805 and s["head_fp32_params"] == 10
    assert all(sizes[a] > sizes[b] for a, b in pairwise(BITS))  # strictly smaller at each step down


# ------------------------------------------------------------------ BN folding and thresholds


@pytest.mark.parametrize("shape", [(16, 7), (4, 7, 9, 9), (3, 7, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_batch_norm_is_bit_identical_and_folds_to_itself(shape, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels-last is a 4-D layout")
    torch.manual_seed(5)
    bn = nn.BatchNorm1d(7) if len(shape) < 4 else nn.BatchNorm2d(7)
    with torch.no_grad():
        bn.weight.normal_(), bn.bias.normal_(), bn.running_mean.normal_(0, 3), bn.running_var.uniform_(1e-3, 5)
    bn.eval()
    x = torch.randn(*shape) * 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = bn(x)
    scale, shift = fold_batch_norm(bn)
    load_folded(bn, scale, shift)
    assert torch.equal(bn(x), before) and is_folded(bn)
    again = fold_batch_norm(bn)
    assert torch.equal(again[0], scale) and torch.equal(again[1], shift)


def test_sign_thresholds_are_exact_at_and_beside_the_boundary():
    torch.manual_seed(6)
    scale, shift = torch.randn(32), torch.randn(32) * 3
    scale[:2] = 0.0
    shift[1] = -1.0
    direction, threshold = sign_threshold(scale, shift)
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    x = torch.cat(
        [
            torch.randn(5000, 32) * 5,
            threshold[None],
            torch.nextafter(threshold, up)[None],
            torch.nextafter(threshold, down)[None],
        ]
    )
    folded = nn.BatchNorm1d(32).eval()
    load_folded(folded, scale, shift)
    with torch.no_grad():
        exact = folded(x) >= 0  # torch's own BatchNorm kernel
    assert torch.equal(exact, direction * (x - threshold) >= 0)


def test_folding_a_batch_norm_without_affine_parameters():
    """``affine=False`` folds as weight 1, bias 0: a BatchNorm loaded with the folded pair computes the same."""
    torch.manual_seed(7)
    plain = nn.BatchNorm2d(7, affine=False)
    with torch.no_grad():
        plain.running_mean.normal_(0, 3), plain.running_var.uniform_(1e-3, 5)
    plain.eval()
    x = torch.randn(4, 7, 5, 5) * 4
    folded = nn.BatchNorm2d(7).eval()
    load_folded(folded, *fold_batch_norm(plain))
    with torch.no_grad():
        assert torch.equal(folded(x), plain(x))


def float32_nearest(q: Fraction) -> float:
    """The float32 nearest to the rational ``q`` (ties to even), by exact comparison with its neighbours."""
    guess = np.float32(float(q))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    best = min(candidates, key=lambda f: (abs(Fraction(float(f)) - q), int(np.array(f).view(np.int32)) & 1))
    return float(best)


def test_fma32_rounds_once_as_fmaf_does():
    """Random operands, and the cases where rounding a float64 sum to float32 would round twice: the exact
    value lies just beside a halfway point (1 + 2^-23 + 2^-24 - 2^-64 must give 1 + 2^-23, not 1 + 2^-22),
    and a tiny negative value that rounds to -0."""
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(2000, generator=gen) * 10, torch.randn(2000, generator=gen)
    c = torch.randn(2000, generator=gen) * torch.logspace(-6, 6, 2000)
    tricky = [
        (2.0**-24 * (1 + 2.0**-20), 1 - 2.0**-20, 1 + 2.0**-23),
        (2.0**-24 * (1 + 2.0**-20), -(1 - 2.0**-20), 1.0),
        (2.0**-100, -(2.0**-50), 0.0),
        (2.0**-149, 0.5, 0.0),
        (-(2.0**-149), 0.5, 0.0),
        (3.0, 2.0**-149, -(2.0**-148)),
    ]
    a = torch.cat([a, torch.tensor([t[0] for t in tricky])])
    b = torch.cat([b, torch.tensor([t[1] for t in tricky])])
    c = torch.cat([c, torch.tensor([t[2] for t in tricky])])
    got = fma32(a, b, c)
    want = [
        float32_nearest(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
        for x, y, z in zip(a, b, c, strict=True)
    ]
    assert torch.equal(got, torch.tensor(want)) and got[-6] == 1 + 2.0**-23


def test_the_packed_ste_base_stores_its_pre_classifier_norm_as_thresholds():
    base, _ = make_base("ste")
    header = pack_base(base)[1]
    kinds = {entry[0]: entry[1] for entry in header["layout"]}
    assert kinds["feature_norm"] == "threshold" and kinds["stem.1"] == "bnfold"
    assert kinds["stages.0.0.bn1"] == "bnfold"  # LoRA's conv2 branch reads its real output
    x = torch.randn(16, 3, 32, 32)
    loaded = repack(base)[0]
    with torch.no_grad():
        assert torch.equal(base(x), loaded(x))
        features = base.pre_classifier(base.stage_outputs(x)[-1])
        assert torch.equal(features >= 0, loaded.pre_classifier(loaded.stage_outputs(x)[-1]) >= 0)


# ------------------------------------------------------------------ adapter files at real bits


def trained(strategy: str, base: nn.Module, bits: int, variant: str = "plain") -> nn.Module:
    return adapted(strategy, base, variant, bits=bits, jitter=0.05)


CASES = [(s, b, "plain") for s in TRAINED for b in BITS]
CASES += [(s, b, v) for s in ("serial", "udta", "lora", "head_only") for b in (8, 4, 1) for v in ("pruned",)]
CASES += [(s, b, "bn_drift") for s in ("serial", "bitfit", "udta") for b in (4, 1)]


@pytest.mark.parametrize(("strategy", "bits", "variant"), CASES)
@pytest.mark.parametrize("name", list(BASES))
def test_files_at_real_bits_load_to_identical_predictions(strategy, bits, variant, name, tmp_path):
    base, size = make_base(name)
    model = trained(strategy, base, bits, variant)
    path = tmp_path / "a.safetensors"
    export_adapter(model, path, reference_base=base)
    attached = attach_adapter(path, repack(base)[0])
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), attached(x))
    ours, theirs = summarize(model), summarize(attached.model)
    for key in ("introduced_fp32_params", "introduced_binary_params", "introduced_quantized_params", "introduced_bits"):
        assert ours[key] == theirs[key], key
    records = attached.meta["records"]
    for key, record in records.items():  # each quantised weight is stored at its trained width
        module = attached.model.get_submodule(key.rpartition(".")[0]) if not key.startswith("base.") else None
        if module is not None and getattr(module, "weight_quantizer", None) is not None and key.endswith(".weight"):
            assert record["codec"] == f"q{bits}", key
            if record["enc"] == "dense":
                rows = module.weight.shape[0]
                assert record["bytes"] == (module.weight.numel() * bits + 7) // 8 + 4 * rows
    # and export again from what was loaded (task=export re-encodes): the very same bytes
    again = tmp_path / "b.safetensors"
    with substituted(attached.model.base, attached.base_overrides):
        export_adapter(attached.model, again, reference_base=base)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("strategy", ["serial", "udta", "lora"])
def test_fewer_bits_make_smaller_files(strategy, tmp_path):
    base, _ = make_base("reactnet")
    sizes = []
    for bits in BITS:
        path = tmp_path / f"{bits}.safetensors"
        export_adapter(trained(strategy, base, bits), path, reference_base=base)
        sizes.append(path.stat().st_size)
    assert all(a > b for a, b in pairwise(sizes)) and sizes[-1] < sizes[0] / 3


def test_attaching_onto_an_unfolded_base_folds_a_copy(tmp_path):
    base, size = make_base("ste")
    model = trained("bitfit", base, 1, "bn_drift")
    export_adapter(model, tmp_path / "a.safetensors", reference_base=base)
    attached = attach_adapter(tmp_path / "a.safetensors", base)  # as stored, BN unfolded
    assert attached.model.base is not base and not any(
        is_folded(m) for m in base.modules() if isinstance(m, nn.BatchNorm2d)
    )
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), attached(x))
        assert torch.equal(base(x), fold_norms(copy.deepcopy(base))(x))


# ------------------------------------------------------------------ sizes on disk


@pytest.mark.parametrize("bits", [32, 4, 1])
def test_adapter_files_stay_within_10_percent_of_the_formula_at_real_bits(bits, tmp_path):
    """make sizes' thesis configurations (full width), pruning at 0.9 and 0.99 too; the issue's target.

    Below 4 bits a 0.9-pruned file cannot meet it: where its 10 % of weights are takes log2 C(n, k) bits
    (H(0.1) = 0.47 bit a weight) that the formula (kept weights only, 1 bit each at 1 bit) does not
    charge; there the file is held to 1.10 x (formula + that least cost)."""
    from bnn_adapt.thesis import sizes

    chosen = (
        "serial, stages 1-3, g=20",
        "udta concat, g=channels",
        "udta concat, prune 0.9",
        "udta concat, prune 0.99",
        "bitfit",
        "udta concat",
    )
    configs = [c for c in sizes.ADAPTERS if c[0].startswith("CIFAR") and c[1] in chosen]
    files = [f for f in sizes.adapter_files(tmp_path, configs, bits=(bits,)) if f.dtype == "fp32"]
    assert len(files) == (6 if bits == 32 else 5)  # the STE BitFit has no weights below 32 bits to change
    for f in files:
        if bits == 1 and f.label.endswith("prune 0.9"):
            assert f.positions > 0.5 * f.formula and f.ratio_with_positions <= sizes.ADAPTER_TARGET, (f.file, f.formula)
        else:
            assert f.ratio <= sizes.ADAPTER_TARGET, (f.label, f.bits, f.file, f.formula)


# ------------------------------------------------------------------ runs, configs, tables, search


def test_bits_keep_old_config_hashes_only_at_32():
    plain = config_hash(without_hydra_node(compose(["adapter=serial"])))
    assert config_hash(without_hydra_node(compose(["adapter=serial", "adapter.bits=32"]))) == plain
    assert config_hash(without_hydra_node(compose(["adapter=serial", "adapter.bits=4"]))) != plain


def test_a_bad_width_on_the_command_line_is_one_error_line(make_cfg):
    with pytest.raises(ConfigError, match=r"adapter.bits=3 is invalid: use one of 32, 16, 8, 4, 2, 1"):
        task.run(make_cfg("data=cifar5_5", "adapter=serial", "adapter.bits=3"))


def test_labels_name_the_bits():
    assert run_label({"config": {"adapter": {"name": "udta", "head": "concat", "bits": 4}}}) == "udta head=concat 4-bit"
    assert run_label({"config": {"adapter": {"name": "udta", "head": "concat", "bits": 32}}}) == "udta head=concat"


def test_a_run_at_two_bits_reports_real_bits_and_its_file_predicts_as_it_trained(pretrained_base, make_cfg, capsys):
    overrides = (
        "data=cifar5_5",
        "adapter=udta",
        "adapter.bits=2",
        "reduction=prune",
        "reduction.rate=0.5",
        "trainer.max_epochs=2",
    )
    cfg = make_cfg(*overrides)
    metrics = task.run(cfg)
    summary = task.run(make_cfg(*overrides, "summary_only=true", name="summary"))
    for key in ("introduced_fp32_params", "introduced_binary_params", "weight_bits"):  # scales: one per live channel
        assert metrics[key] == summary[key], key
    # a pruned quantised weight counts its non-zero codes: summary_only sees the initial weights' codes
    assert metrics["introduced_quantized_params"] == pytest.approx(summary["introduced_quantized_params"], rel=0.05)
    assert metrics["weight_bits"] == 2 and metrics["introduced_quantized_params"] > 0
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["size_pct"] == pytest.approx(metrics["size_pct"])
    assert (
        metrics["size_pct"]
        < task.run(make_cfg(*overrides[:2], "reduction=prune", "reduction.rate=0.5", "summary_only=true", name="s32"))[
            "size_pct"
        ]
    )
    # the run's own file: task=export re-encodes it to the same tensors, the manifest counts real bits
    out = Path(cfg.paths.output_dir).parent / "export"
    manifest = task.run(
        make_cfg("task=export", f"export.adapter_run=[{cfg.paths.output_dir}]", f"export.dir={out}", name="export")
    )
    name, entry = next((n, e) for n, e in manifest["files"].items() if e["kind"] == "adapter")
    assert entry["predicted_bytes"] == metrics["introduced_bits"] / 8 and entry["weight_bits"] == 2
    base, _ = read_packed_base(out / BASE_FILE)
    ours, theirs = (stored_tensors(f, base) for f in (Path(cfg.paths.output_dir) / ADAPTER_FILE, out / name))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the exported file reproduces the run's final accuracy on its own evaluation batches
    adapter = attach_adapter(out / name, base)
    datamodule = builders.build_datamodule(cfg, "target")
    datamodule.setup("fit")
    correct = total = 0
    with torch.no_grad():
        for i, (images, labels) in enumerate(datamodule.val_dataloader()):
            if i == cfg.trainer.limit_val_batches:
                break
            correct += int((adapter(images).argmax(1) == labels).sum())
            total += len(labels)
    assert correct / total == pytest.approx(metrics["test_top1"], abs=1e-6)
    # make sizes --runs: the run's own file against its formula, and as plain (format 2) streams
    from bnn_adapt.thesis import sizes

    capsys.readouterr()
    assert sizes.main(["--runs", cfg.paths.output_dir, str(out)]) == 0  # the export folder has no run: skipped
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 1 and rows[0][1:3] == ["udta, prune 0.5", "2"]
    file = (Path(cfg.paths.output_dir) / ADAPTER_FILE).stat().st_size
    assert (
        rows[0][3:5] == [f"{round(metrics['introduced_bits'] / 8):,}", f"{file:,}"]
        and int(rows[0][6].replace(",", "")) > file
    )


def test_front_comparison_and_hypervolume_by_hand():
    front = [{"size_pct": 1.0, "val_top1": 0.6}, {"size_pct": 3.0, "val_top1": 0.8}]
    baseline = [
        {"size_pct": 2.0, "val_top1": 0.55},
        {"size_pct": 4.0, "val_top1": 0.8},
        {"size_pct": 9.0, "val_top1": 0.9},
    ]
    assert hypervolume(front) == pytest.approx(2 * 0.6 + 2 * 0.8)
    assert hypervolume(baseline) == pytest.approx(2 * 0.55 + 1 * 0.8)
    found = compare_fronts(front, baseline)
    assert found["baseline_points"] == 2 and found["baseline_points_dominated"] == 2 and found["dominates"]
    assert not compare_fronts(baseline, front)["dominates"]


@pytest.mark.parametrize("head", ["adapter", "concat"])
@pytest.mark.parametrize(
    "make",
    [lambda: STEResNetCIFAR(num_classes=10, width=0.25), lambda: ReActNet18(num_classes=10, width=0.125)],
    ids=["ste", "reactnet"],
)
def test_the_thesis_convention_counts_quantised_weights_at_their_width(head, make):
    """The thesis convention's size % at real bits: the adapter's quantised weights and a quantised (fp32, ReActNet) concat
    head's extra columns count at their width, never as fp32 and never dropped."""
    base = make()
    model = Parallel(base, 5, head=head, bits=4)
    full, four = summarize(Parallel(base, 5, head=head, bits=32)), summarize(model)
    t32, t4 = full["thesis"], four["thesis"]
    adapter_q = four["adapter_quantized_params"]
    head_extra = t4["introduced_quantized_params"] - adapter_q
    assert adapter_q > 0 and (head_extra > 0) == (head == "concat" and isinstance(base, ReActNet18))
    if head_extra:  # the extra columns, as at 32 bits
        weight = next(m.weight for m in model.head.modules() if hasattr(m, "in_features"))
        assert head_extra == weight.numel() - 5 * base.stage_channels[-1]  # the columns beyond a plain head
    assert t4["introduced_binary_params"] == t32["introduced_binary_params"]
    base_bits = 32 * t4["base_fp32_params"] + t4["base_binary_params"]
    bits = 32 * t4["introduced_fp32_params"] + t4["introduced_binary_params"] + 4 * t4["introduced_quantized_params"]
    assert t4["size_pct"] == pytest.approx(100 * bits / base_bits, rel=1e-12)
    assert t4["size_pct"] < t32["size_pct"]
