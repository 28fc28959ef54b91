"""Reliability, round 3 (issue 23): the thread count is a key and every result records what
decides it to the bit; a finished run counts only for the data it read; a failure after
training keeps what was measured and ``resume=true`` redoes only that step; the root config
carries no demo values into other datasets. (Items 2, 4, 8 and 9 are tested elsewhere;
item 7, packed inference, in test_packed_inference.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from bnn_adapt.adapters.file import attach_adapter
from bnn_adapt.bases import load_base
from bnn_adapt.errors import CheckpointError, ConfigError
from bnn_adapt.files import read_json
from bnn_adapt.run import builders, provenance, record, results, task
from bnn_adapt.run.config import compose, without_hydra_node
from bnn_adapt.run.results import config_hash
from bnn_adapt.training.module import Classifier
from tests.helpers.cli import error_lines, run_here

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ 1: threads, and what a result records


def test_threads_sets_torchs_threads_before_anything_is_built_and_the_run_records_them(
    make_cfg, pretrained_base, monkeypatch
):
    seen = []
    build = builders.build_adapted
    monkeypatch.setattr(
        builders, "build_adapted", lambda *a, **k: seen.append(torch.get_num_threads()) or build(*a, **k)
    )
    before = torch.get_num_threads()
    metrics = task.run(make_cfg("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=1", "threads=2"))
    assert seen and set(seen) == {2}, "every model was built at 2 threads"
    assert torch.get_num_threads() == before, "the thread count is given back after the run"
    env = metrics["environment"]
    assert env["threads"] == 2
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cuda"] == torch.version.cuda and metrics["versions"]["torch"] == torch.__version__.split("+")[0]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert env["git_commit"].removesuffix("+dirty") == head.stdout.strip()
    assert read_json(Path(metrics["config"]["paths"]["output_dir"]) / "metrics.json")["environment"] == env


def test_threads_null_is_torchs_choice_and_does_not_change_the_config_hash(make_cfg):
    cfg = make_cfg()
    assert cfg.threads is None
    assert config_hash(without_hydra_node(make_cfg("threads=3"))) == config_hash(without_hydra_node(cfg))


@pytest.mark.parametrize("value", [0, -1, "two", True])
def test_a_bad_thread_count_is_one_clear_error(value, make_cfg):
    with pytest.raises(ConfigError, match=r"threads=.* is invalid: give a positive number"):
        task.run(make_cfg(f"threads={value}"))


def test_the_commit_is_null_outside_a_git_checkout_never_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)  # an installed package: no checkout of its own
    assert provenance.git_commit() is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert provenance.git_commit() is None


# ------------------------------------------------------------------ 3: a result stands only for the data it read


def rerun_skipped(cfg) -> bool:
    """Whether the task finds ``cfg``'s directory complete (and would skip the run)."""
    return task.skip_or_rerun(without_hydra_node(cfg), waited=False) is not None


@pytest.fixture
def finished(make_cfg, pretrained_base, data_dir, tmp_path):
    """A finished adaptation run on a copy of the session's data (its own files to touch)."""
    mine = tmp_path / "data"
    shutil.copytree(data_dir / "cifar10", mine / "cifar10")
    cfg = make_cfg("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=1")
    cfg.paths.data_dir = str(mine)
    task.run(cfg)
    assert rerun_skipped(cfg)
    return cfg, mine


def test_the_same_sweep_on_another_copy_of_the_data_is_not_skipped(finished, tmp_path, capsys):
    cfg, mine = finished
    other = tmp_path / "other"
    shutil.copytree(mine, other)  # copy2: same names, sizes and times, another place
    cfg.paths.data_dir = str(other)
    assert not rerun_skipped(cfg)
    capsys.readouterr()
    metrics = task.run(cfg)
    assert "no longer stands for this config (it read the data at" in capsys.readouterr().out
    assert metrics["data"]["location"] == str((other / "cifar10" / "cifar-10-batches-py").resolve())
    assert metrics["data"]["files"] == len(list((other / "cifar10" / "cifar-10-batches-py").iterdir()))


def test_another_bnn_adapt_root_is_other_data(make_cfg, pretrained_base, data_dir, tmp_path, monkeypatch):
    """``paths`` resolve from BNN_ADAPT_ROOT when the run starts: the same composed config on two roots."""
    for root in ("a", "b"):
        shutil.copytree(data_dir / "cifar10", tmp_path / root / "data" / "cifar10")
    cfg = make_cfg(
        "data=cifar5_5", "adapter=head_only", "trainer.max_epochs=1", f"base.checkpoint={pretrained_base['checkpoint']}"
    )
    cfg.paths.root_dir = "${oc.env:BNN_ADAPT_ROOT}"
    cfg.paths.data_dir = "${paths.root_dir}/data"
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path / "a"))
    task.run(cfg)
    assert rerun_skipped(cfg)
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path / "b"))
    assert not rerun_skipped(cfg)


def test_touching_or_replacing_a_data_file_makes_the_run_stale(finished):
    cfg, mine = finished
    batch = mine / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    later = time.time() + 5
    os.utime(batch, (later, later))
    assert not rerun_skipped(cfg), "a touched file"
    task.run(cfg)
    assert rerun_skipped(cfg)
    batch.write_bytes(batch.read_bytes() + b"\0")  # replaced by another file of the same name
    assert not rerun_skipped(cfg), "a replaced file"


def test_a_new_results_schema_makes_every_run_stale(finished, monkeypatch):
    cfg, _ = finished
    monkeypatch.setattr(record, "RESULTS_SCHEMA", record.RESULTS_SCHEMA + 1)
    assert not rerun_skipped(cfg)


def test_a_new_hash_version_makes_every_run_stale(finished, monkeypatch):
    cfg, _ = finished
    monkeypatch.setattr(results, "HASH_VERSION", results.HASH_VERSION + 1)
    assert not rerun_skipped(cfg)


def test_a_run_without_a_data_fingerprint_is_stale(finished):
    cfg, _ = finished
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    del metrics["data"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    assert not rerun_skipped(cfg)


# ------------------------------------------------------------------ 5: a failure after training loses nothing


@pytest.fixture
def counted_training(monkeypatch) -> list:
    """Training steps taken from here on (one entry per step)."""
    steps = []
    training_step = Classifier.training_step
    monkeypatch.setattr(Classifier, "training_step", lambda self, *a: steps.append(1) or training_step(self, *a))
    return steps


def test_a_failed_adapter_file_keeps_the_metrics_and_resume_writes_only_it(
    make_cfg, pretrained_base, monkeypatch, counted_training, tmp_path
):
    overrides = ("data=cifar5_5", "adapter=udta", "reduction=prune", "reduction.rate=0.5", "trainer.max_epochs=2")
    cfg = make_cfg(*overrides)
    run_dir = Path(cfg.paths.output_dir)
    real_export = task.export_adapter

    def full_disk(model, path, **kwargs):
        real_export(model, tmp_path / "as_trained.safetensors", **kwargs)  # what the run would have written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(task, "export_adapter", full_disk)
    with pytest.raises(
        task.FailedAfterTraining, match="adapter file failed after training .*resume=true finishes the run"
    ):
        task.run(cfg)
    recorded = read_json(run_dir / "metrics.json")
    assert recorded["status"] == "failed_after_training" and recorded["failed_step"] == "adapter file"
    assert "No space left on device" in recorded["error"]
    assert recorded["test_top1"] is not None and len(recorded["history"]) == recorded["epochs_run"] == 2
    assert recorded["size_pct"] > 0 and recorded["environment"]["threads"] >= 1
    assert not (run_dir / "adapter.safetensors").exists()
    trained_steps = len(counted_training)
    assert trained_steps > 0

    monkeypatch.setattr(task, "export_adapter", real_export)
    assert not rerun_skipped(cfg), "not complete"
    done = task.run(make_cfg(*overrides, "resume=true"))
    assert len(counted_training) == trained_steps, "resume trained again"
    assert done["status"] == "complete" and "failed_step" not in done
    same = ("test_top1", "best_test_top1", "best_before_pruning_top1", "history", "epoch_time_s", "size_pct")
    assert {k: done[k] for k in same} == {k: recorded[k] for k in same}
    assert read_json(run_dir / "metrics.json")["status"] == "complete" and rerun_skipped(cfg)
    base = load_base("ste_resnet_cifar", pretrained_base["checkpoint"], "").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        resumed = attach_adapter(run_dir / "adapter.safetensors", base)(x)
        expected = attach_adapter(tmp_path / "as_trained.safetensors", base)(x)
    assert torch.equal(resumed, expected), "the adapter from the last checkpoint is the one training left"


def test_a_tracker_failing_at_the_end_of_fitting_keeps_the_metrics(
    make_cfg, pretrained_base, monkeypatch, counted_training
):
    from bnn_adapt.run.tracking import TrackerRecords

    def unreachable(self, trainer, pl_module):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(TrackerRecords, "on_fit_end", unreachable)
    overrides = ("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=1", "logger=[csv,tensorboard]")
    cfg = make_cfg(*overrides)
    with pytest.raises(task.FailedAfterTraining, match="end of fitting failed after training"):
        task.run(cfg)
    recorded = read_json(Path(cfg.paths.output_dir) / "metrics.json")
    assert recorded["status"] == "failed_after_training" and recorded["failed_step"] == "end of fitting"
    assert "ConnectionError: tracking server unreachable" in recorded["error"] and recorded["test_top1"] is not None
    steps = len(counted_training)
    done = task.run(make_cfg(*overrides, "resume=true"))
    assert len(counted_training) == steps and done["status"] == "complete"
    assert (Path(cfg.paths.output_dir) / "adapter.safetensors").is_file()


def test_a_failed_base_file_keeps_the_pretraining_metrics(make_cfg, tmp_path, monkeypatch, counted_training):
    overrides = ("data=cifar5_5", "task=pretrain", "adapter=full_finetune", "trainer.max_epochs=1")
    cfg = make_cfg(*overrides, base_dir=tmp_path / "bases")
    real_save = task.save_base

    def fails(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(task, "save_base", fails)
    with pytest.raises(task.FailedAfterTraining, match="base checkpoint failed after training"):
        task.run(cfg)
    recorded = read_json(Path(cfg.paths.output_dir) / "metrics.json")
    assert recorded["failed_step"] == "base checkpoint" and recorded["test_top1"] is not None
    assert not Path(cfg.base.save_to).exists()
    steps = len(counted_training)
    monkeypatch.setattr(task, "save_base", real_save)
    done = task.run(make_cfg(*overrides, "resume=true", base_dir=tmp_path / "bases"))
    assert len(counted_training) == steps and done["status"] == "complete"
    assert Path(cfg.base.save_to).is_file()
    saved = torch.load(cfg.base.save_to, weights_only=False)
    assert saved["top1"] == recorded["test_top1"] and saved["epoch"] == 0


# ------------------------------------------------------------------ 6: no demo values in other datasets' runs


def test_the_root_config_carries_no_demo_values_into_other_datasets():
    other = compose(["data=cifar5_5", "adapter=serial"])
    assert other.base.width == 1.0 and other.trainer.max_epochs == 75
    assert other.scheduler is None and other.base.pretrain is None
    demo = compose([])  # `python -m bnn_adapt`: the digits demo, as the README says
    assert demo.data.name == "digits" and demo.adapter.name == "udta" and demo.base.width == 0.25
    assert demo.trainer.max_epochs == 10 and demo.scheduler.T_max == 10
    assert dict(demo.base.pretrain) == {"epochs": 15, "lr": 1.0e-3}


def test_another_dataset_without_its_base_stops_with_one_line(tmp_path):
    """`python -m bnn_adapt data=cifar5_5 adapter=serial` used to train a width-0.25 network after pretraining
    a CIFAR base silently (root config: base.pretrain)."""
    result = run_here(tmp_path, "bnn_adapt", "data=cifar5_5", "adapter=serial")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "pretrain it first with `python -m bnn_adapt +experiment=cifar5_5_base`" in line
    assert not list((tmp_path / "outputs").glob("bases/*")), "nothing is pretrained"


def test_with_its_data_there_the_run_still_stops_before_pretraining(make_cfg, tmp_path):
    cfg = make_cfg("data=cifar5_5", "adapter=serial", base_dir=tmp_path / "bases")
    with pytest.raises(
        CheckpointError, match=r"pretrain it first with `python -m bnn_adapt \+experiment=cifar5_5_base"
    ):
        task.run(cfg)
    assert not (tmp_path / "bases").exists() and not (tmp_path / "run" / "base_pretrain").exists()
