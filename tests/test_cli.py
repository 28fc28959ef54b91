"""The command line, ``python -m bnn_adapt ...``: every experiment's summary,
user errors as one line, Hydra's own messages, and a real run on image folders.

Each subprocess pays ~10 s of imports on a small CPU box, so the per-experiment
summaries run in-process on the same composed configs (the CLI path is proved
by a handful of real subprocess calls below).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from bnn_adapt.run import builders, task
from tests.helpers.cli import REPO_ROOT, run_here, run_module
from tests.helpers.data import write_imagefolder

EXPERIMENTS = sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))

ADAPT_SUMMARY_KEYS = {
    "base_binary_params",
    "base_fp32_params",
    "adapter_fp32_params",
    "adapter_binary_params",
    "head_fp32_params",
    "head_binary_params",
    "size_pct",
    "adapter_size_pct",
    "task",
    "config_hash",
    "macs_binary",
    "macs_fp32",
    "binary_mac_share",
    "adapter_macs",
    "macs_per_layer",
}
PRETRAIN_SUMMARY_KEYS = {"base_binary_params", "base_fp32_params", "task", "config_hash", "macs_binary", "macs_fp32"}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------ expected counts (docs/concepts.md)


def stage_channels(cfg) -> list[int]:
    widths = (80, 160, 320) if cfg.base.name == "ste_resnet_cifar" else (64, 128, 256, 512)
    return [max(1, int(round(c * cfg.base.width))) for c in widths]


def serial_params(channels: list[int], stages, groups: int = 1) -> int:
    """``4C + C*C/g`` per adapted stage."""
    return sum(4 * c + c * c // groups for c in (channels[s - 1] for s in stages))


def udta_params(channels: list[int], rate: float = 0.0, groups: int = 1) -> int:
    """``c_in*(9 + 2) + c_in*c_out/g + 2*c_out`` per thin block, minus what pruning zeroes:
    whole depthwise filters (9 weights each) and single pointwise weights, ``round(rate * n)`` each."""
    total = 0
    for c_in, c_out in zip(channels, [*channels[1:], channels[-1]], strict=True):
        pointwise = c_in * c_out // groups
        total += c_in * 9 - 9 * round(rate * c_in) + pointwise - round(rate * pointwise) + 2 * c_in + 2 * c_out
    return total


def expected_head(cfg, channels: list[int], num_classes: int) -> tuple[int, int]:
    """(fp32, binary) params of the new head: STE binary linear (bias counted binary) + BN1d; ReActNet fp32 linear."""
    in_features = channels[-1]
    if cfg.adapter.name == "udta":
        in_features = channels[-1] + (channels[-1] if cfg.adapter.head == "concat" else 0)
    if cfg.base.name == "ste_resnet_cifar":
        return 2 * num_classes, in_features * num_classes + num_classes
    return in_features * num_classes + num_classes, 0


# ------------------------------------------------------------------ summary_only, every experiment


def test_every_experiment_is_listed():
    assert len(EXPERIMENTS) >= 20
    assert {"digits5_5", "cifar80_20_udta", "flowers102_udta", "pets_head_only", "cifar5_5_base"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_summary_only_works_offline_for_every_experiment(experiment, make_cfg, tmp_path):
    """Full-size models as each experiment configures them; no data and no base checkpoint present."""
    from omegaconf import open_dict

    cfg = make_cfg(f"+experiment={experiment}", "summary_only=true", tiny=False, base_dir=tmp_path / "no_bases")
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "no_data")  # nothing to read: summary must not touch data
    summary = task.run(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = read_json(out / "summary.json")
    assert on_disk == json.loads(json.dumps(summary))
    assert not (tmp_path / "no_data").exists()

    if cfg.task == "pretrain":
        assert experiment.endswith("_base")
        assert not PRETRAIN_SUMMARY_KEYS - on_disk.keys()
        assert on_disk["task"] == "pretrain" and on_disk["base_binary_params"] > on_disk["base_fp32_params"] > 0
        return
    missing = ADAPT_SUMMARY_KEYS - on_disk.keys()
    assert not missing, f"summary.json lacks {sorted(missing)}"
    assert on_disk["task"] == "adapt"
    assert on_disk["base_binary_params"] > 0 and on_disk["base_fp32_params"] > 0
    assert 0 < on_disk["adapter_size_pct"] <= on_disk["size_pct"] or cfg.adapter.name == "head_only"

    num_classes = builders.target_num_classes(cfg)
    channels = stage_channels(cfg)
    rate = cfg.reduction.rate if cfg.reduction.name == "prune" else 0.0
    expected_adapter = {
        "head_only": 0,
        "serial": serial_params(channels, cfg.adapter.get("stages", ()), cfg.adapter.get("groups") or 1),
        "udta": udta_params(channels, rate, cfg.adapter.get("groups") or 1),
    }
    if cfg.adapter.name in expected_adapter:
        assert on_disk["adapter_fp32_params"] == expected_adapter[cfg.adapter.name]
        assert on_disk["adapter_binary_params"] == 0
    else:  # full_finetune: the whole base body is "introduced"
        assert on_disk["adapter_binary_params"] > 0 and on_disk["size_pct"] > 50
    head_fp32, head_binary = expected_head(cfg, channels, num_classes)
    assert (on_disk["head_fp32_params"], on_disk["head_binary_params"]) == (head_fp32, head_binary)


def test_summary_matches_spec_numbers_for_the_cifar_base(make_cfg, tmp_path):
    """STE ResNet per-layer counts, C = 5: binary weights and (BN) fp32 parameters of the full-width STE net."""
    cfg = make_cfg("+experiment=cifar5_5_head_only", "summary_only=true", tiny=False, base_dir=tmp_path)
    summary = task.run(cfg)
    stem, stage1 = 2_160, 4 * 57_600
    stage2 = 115_200 + 3 * 230_400 + 12_800
    stage3 = 460_800 + 3 * 921_600 + 51_200
    linear = 320 * 5 + 5
    assert summary["base_binary_params"] == stem + stage1 + stage2 + stage3 + linear
    bn = 2 * 80 + 4 * 2 * 80 + 5 * 2 * 160 + 5 * 2 * 320 + 640 + 2 * 5
    assert summary["base_fp32_params"] == bn


# ------------------------------------------------------------------ through the real command line


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_module(tmp_path, "bnn_adapt", *args)


@pytest.mark.integration
def test_cli_summary_only_multirun_reports_pruned_counts(tmp_path):
    """One process, two Hydra jobs: the UDTA adapter without and with 90% pruning."""
    sweep = tmp_path / "sweep"
    result = cli(
        tmp_path,
        "--multirun",
        "+experiment=cifar80_20_udta",
        "reduction=none,prune",
        "summary_only=true",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    plain, pruned = (read_json(sweep / str(job) / "summary.json") for job in (0, 1))
    for job in (0, 1):  # Hydra's record of the job: its config and overrides
        assert (sweep / str(job) / ".hydra" / "config.yaml").is_file()
        assert (sweep / str(job) / ".hydra" / "overrides.yaml").is_file()
    overrides = yaml.safe_load((sweep / "1" / ".hydra" / "overrides.yaml").read_text())
    assert "reduction=prune" in overrides

    channels = [80, 160, 320]
    assert plain["adapter_fp32_params"] == udta_params(channels) == 174_160
    assert pruned["adapter_fp32_params"] == udta_params(channels, rate=0.9) < plain["adapter_fp32_params"]
    assert pruned["adapter_size_pct"] < plain["adapter_size_pct"]
    assert pruned["size_pct"] < plain["size_pct"]
    # pruning touches the adapter only
    for key in ("head_fp32_params", "head_binary_params", "base_binary_params", "base_fp32_params"):
        assert pruned[key] == plain[key]
    assert pruned["config_hash"] != plain["config_hash"]
    assert "size" in result.stdout and "adapter" in result.stdout  # the per-layer table was printed


@pytest.mark.integration
def test_cli_bad_groups_value_is_one_error_line(tmp_path):
    run_dir = tmp_path / "run"
    result = cli(
        tmp_path,
        "+experiment=cifar80_20_serial",
        "adapter.groups=7",
        "summary_only=true",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "adapter.groups=7" in errors[0]
    assert "valid values: [1, 2, 4, 5, 8, 10, 16, 20, 40, 80]" in errors[0] and "channels" in errors[0]
    assert not (run_dir / "summary.json").exists()


def test_cli_unknown_adapter_lists_the_options(tmp_path):
    result = run_here(
        tmp_path, "bnn_adapt", "adapter=no_such_adapter", "summary_only=true", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode != 0
    assert "Could not find 'adapter/no_such_adapter'" in result.stderr
    assert "Available options in 'adapter'" in result.stderr
    for option in ("full_finetune", "head_only", "serial", "udta"):
        assert option in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_imagefolder_pretrains_base_then_adapts(tmp_path):
    """The user's own folders with ``base.pretrain`` (issue 23: the root config no longer sets it for
    every dataset): the missing base is pretrained on the base folders and cached, then the adapter
    trains on the target folders."""
    write_imagefolder(tmp_path / "data" / "my_images", classes=("cat", "dog", "3", "bird", "7"), n_per_class=8)
    run_dir = tmp_path / "run"
    result = run_here(
        tmp_path,
        "bnn_adapt",
        "data=imagefolder",
        "data.base_classes=[cat,3]",
        "data.target_classes=[dog,7,bird]",
        "base.width=0.1",
        "base.pretrain={epochs:1,lr:1e-3}",
        "trainer.max_epochs=2",
        "data.batch_size=16",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "adapt done: top-1" in result.stdout

    base = tmp_path / "outputs" / "bases" / "ste_resnet_cifar_thesis_w0.1_imagefolder_cat_3.pt"
    assert base.is_file(), "the pretrained base was not cached under paths.base_dir"
    pretrain = read_json(run_dir / "base_pretrain" / "metrics.json")
    assert pretrain["task"] == "pretrain" and pretrain["epochs_run"] == 1

    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "csv/metrics.csv",
        "checkpoints/last.ckpt",
        "adapter.safetensors",
        "metrics.json",
    ):
        assert (run_dir / name).is_file(), f"{name} missing from the run dir"
    hydra_config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert hydra_config["data"]["target_classes"] == ["dog", 7, "bird"]
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["class_names"] == ["dog", "7", "bird"]
    assert metrics["epochs_run"] == 2 and metrics["config"]["paths"]["output_dir"] == str(run_dir)
    assert metrics["config"]["base"]["checkpoint"] == str(base)
