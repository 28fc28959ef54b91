"""Reliability: bad input is one clear error before any work, killed runs resume
to the same result, complete runs are not repeated, failures are recorded and
do not stop a sweep, result files are written atomically, runs are repeatable."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnn_adapt.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, UserError
from bnn_adapt.run import task
from bnn_adapt.run.config import without_hydra_node
from bnn_adapt.run.results import config_hash, file_sha256, write_json
from bnn_adapt.training.batches import EpochShuffle
from tests.helpers.cli import REPO_ROOT, environment, run_here, run_module
from tests.helpers.data import write_cifar10, write_imagefolder

#: metrics that must not depend on whether a run was interrupted (timings do)
OUTCOME_KEYS = (
    "test_top1",
    "best_test_top1",
    "epochs_run",
    "size_pct",
    "adapter_fp32_params",
    "head_binary_params",
    "config_hash",
    "status",
)


def cli(tmp_path: Path, *args: str):
    """``python -m bnn_adapt ARGS`` in this process, every output under ``tmp_path``."""
    return run_here(tmp_path, "bnn_adapt", *args)


def outcome(metrics: dict) -> dict:
    history = [{k: v for k, v in h.items()} for h in metrics["history"]]
    return {**{k: metrics.get(k) for k in OUTCOME_KEYS}, "history": history}


# ------------------------------------------------------------------ bad input: one clear error each


@pytest.fixture
def garbage_checkpoint(tmp_path) -> Path:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    return path


@pytest.fixture
def other_arch_checkpoint(tmp_path) -> Path:
    from bnn_adapt.bases import ReActNet18, save_base

    path = tmp_path / "reactnet_in_our_format.pt"
    save_base(ReActNet18(num_classes=5, width=0.125), path)
    return path


BAD_CONFIGS = [
    # (overrides, error class, words the message must contain)
    (["task=train"], ConfigError, ["task", "pretrain, adapt"]),
    (["base.bn=thawed"], ConfigError, ["base.bn", "frozen"]),
    (["adapter=serial", "adapter.stages=[4]"], ConfigError, ["stages", "1..3"]),
    (["adapter=serial", "adapter.stages=[]"], ConfigError, ["stages"]),
    (["adapter.groups=3"], ConfigError, ["valid values", "channels"]),
    (["adapter.groups=0"], ConfigError, ["valid values"]),
    (["reduction=prune", "reduction.rate=1.0"], ConfigError, ["[0, 1)"]),
    (["reduction=prune", "reduction.rate=-0.1"], ConfigError, ["[0, 1)"]),
    (["adapter.head=both"], ConfigError, ["concat", "adapter"]),
    (["data.target_classes=[]"], ConfigError, ["empty"]),
    (["data.target_classes=[3,5]"], ConfigError, ["share [3]", "disjoint"]),
    (["data.target_classes=[5,5]"], ConfigError, ["5"]),
    (["data.target_classes=[5,12]"], ConfigError, ["12"]),
    (["data.image_size=2"], ConfigError, ["image_size", "at least 4"]),
    (["data.batch_size=0"], ConfigError, ["batch_size", "positive"]),
    (["trainer.max_epochs=-1"], ConfigError, ["max_epochs", "positive"]),
    (["optimizer.lr=0"], ConfigError, ["optimizer.lr", "positive"]),
    (["base.width=0"], ConfigError, ["base.width", "positive"]),
    (["data.limit_per_class=0"], ConfigError, ["limit_per_class"]),
    (
        ["trainer.accelerator=gpu"] if not torch.cuda.is_available() else ["trainer.accelerator=tpu"],
        ConfigError,
        ["trainer"],
    ),
    (["resume=maybe"], ConfigError, ["resume", "true or false"]),
]


@pytest.mark.parametrize(("overrides", "error", "words"), BAD_CONFIGS, ids=lambda v: str(v))
def test_bad_config_is_one_clear_error_before_any_work(overrides, error, words, make_cfg, tmp_path):
    cfg = make_cfg("+experiment=digits5_5", *overrides, base_dir=tmp_path / "bases")
    with pytest.raises(error) as err:
        task.run(cfg)
    message = str(err.value)
    for word in words:
        assert word in message, message
    assert "\n" not in message
    # nothing was trained, no base was pretrained, no data was read into a result
    assert not list((tmp_path / "bases").glob("*.pt"))  # (a claim's lock file may be left: it holds nothing)
    assert not (tmp_path / "run" / "checkpoints").exists()


BAD_FILES = [
    (
        "missing checkpoint",
        lambda p, g, o: [f"base.checkpoint={p / 'nope.pt'}", "base.pretrain=null"],
        CheckpointError,
        ["nope.pt", "task=pretrain"],
    ),
    ("unreadable checkpoint", lambda p, g, o: [f"base.checkpoint={g}"], CheckpointError, ["unreadable"]),
    (
        "checkpoint of another architecture",
        lambda p, g, o: [f"base.checkpoint={o}"],
        CheckpointError,
        ["reactnet18", "ste_resnet_cifar"],
    ),
    (
        "missing dataset directory",
        lambda p, g, o: ["data=cifar5_5", f"data.root={p / 'no_cifar'}"],
        DataError,
        ["no_cifar", "data.download=true"],
    ),
]


@pytest.mark.parametrize(("name", "overrides", "error", "words"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_one_clear_error(
    name, overrides, error, words, make_cfg, tmp_path, garbage_checkpoint, other_arch_checkpoint, pretrained_base
):
    cfg = make_cfg("+experiment=digits5_5", *overrides(tmp_path, garbage_checkpoint, other_arch_checkpoint))
    with pytest.raises(error) as err:
        task.run(cfg)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_checkpoint_of_another_width_is_refused(make_cfg, pretrained_base):
    cfg = make_cfg(
        "data=cifar5_5", "adapter=udta", "base.width=0.2", f"base.checkpoint={pretrained_base['checkpoint']}"
    )
    with pytest.raises(CheckpointError, match=r"base.width=0.1"):
        task.run(cfg)


def test_checkpoint_of_another_block_is_refused(make_cfg, tmp_path):
    """A base of BinaryNet's block never loads into the thesis block; one that does not record its block (an
    earlier version's) is refused, never built with a guessed one."""
    from bnn_adapt.bases import STEResNetCIFAR, save_base

    old = tmp_path / "binarynet_block.pt"
    save_base(STEResNetCIFAR(num_classes=5, width=0.1, block="binarynet"), old, image_size=32)
    cfg = make_cfg("data=cifar5_5", "adapter=udta", f"base.checkpoint={old}")
    with pytest.raises(CheckpointError) as err:
        task.run(cfg)
    message = str(err.value)
    assert "block=binarynet" in message and "block=thesis" in message and "set base.block=binarynet" in message
    assert "\n" not in message
    binarynet = ("data=cifar5_5", "adapter=udta", "base.block=binarynet", "trainer.max_epochs=1")
    cfg = make_cfg(*binarynet, f"base.checkpoint={old}", name="old_block_run")
    assert task.run(cfg)["status"] == "complete"

    payload = torch.load(old, weights_only=False)
    del payload["arch_config"]["block"], payload["image_size"]  # as checkpoints before the block was recorded
    unrecorded = tmp_path / "unrecorded_block.pt"
    torch.save(payload, unrecorded)
    with pytest.raises(CheckpointError, match=r"does not record block .*pretrain the base again") as err:
        task.run(make_cfg(*binarynet, f"base.checkpoint={unrecorded}", name="unrecorded_block_run"))
    assert "\n" not in str(err.value)


def test_checkpoint_of_another_image_size_is_refused(make_cfg, pretrained_base):
    cfg = make_cfg(
        "data=cifar5_5", "adapter=udta", "data.image_size=16", f"base.checkpoint={pretrained_base['checkpoint']}"
    )
    with pytest.raises(CheckpointError, match=r"image_size=32.*image_size=16.*set data.image_size=32"):
        task.run(cfg)


def test_empty_or_wrong_format_dataset_directories(make_cfg, tmp_path, pretrained_base):
    (tmp_path / "empty_tree" / "train").mkdir(parents=True)
    (tmp_path / "empty_tree" / "test").mkdir(parents=True)
    wrong = tmp_path / "wrong" / "cifar-10-batches-py"
    wrong.mkdir(parents=True)
    for name in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    ):
        (wrong / name).write_text("not a pickle")
    empty = make_cfg(
        "data=imagefolder",
        f"data.root={tmp_path / 'empty_tree'}",
        "data.base_classes=[a]",
        "data.target_classes=[b]",
        "base.pretrain=null",
        f"base.checkpoint={pretrained_base['checkpoint']}",
    )
    with pytest.raises(UserError):
        task.run(empty)
    garbled = make_cfg("data=cifar5_5", f"data.root={tmp_path / 'wrong'}", "adapter=head_only")
    with pytest.raises(DataError):
        task.run(garbled)


def test_corrupt_image_is_named(make_cfg, tmp_path, pretrained_base):
    root = tmp_path / "images"
    write_imagefolder(root, classes=("a", "b", "c"), n_per_class=4)
    bad = next((root / "train" / "b").iterdir())
    bad.write_bytes(b"\x89PNG broken")
    cfg = make_cfg(
        "data=imagefolder",
        f"data.root={root}",
        "data.base_classes=[a]",
        "data.target_classes=[b,c]",
        "adapter=head_only",
        "base.pretrain=null",
        f"base.checkpoint={pretrained_base['checkpoint']}",
    )
    with pytest.raises(DataError, match=bad.name):
        task.run(cfg)


@pytest.mark.integration
def test_cli_prints_one_line_and_no_traceback_and_debug_shows_it(tmp_path):
    bad = run_module(tmp_path, "bnn_adapt", "reduction=prune", "reduction.rate=1.5", "summary_only=true")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "reduction.rate" in errors[0]
    debug = run_module(
        tmp_path, "bnn_adapt", "reduction=prune", "reduction.rate=1.5", "summary_only=true", "debug=true"
    )
    assert debug.returncode != 0 and "ConfigError" in debug.stderr


# ------------------------------------------------------------------ interruption and resumption


def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    a, b = EpochShuffle(50, seed=3), EpochShuffle(50, seed=3)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    b.set_epoch(1)
    assert list(b) == list(a)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_data")
    write_cifar10(root / "cifar10", n_per_class=64)
    return root


def resume_args(root: Path, run_dir: Path, base: Path, *extra: str) -> list[str]:
    return [
        "data=cifar5_5",
        f"data.root={root / 'cifar10'}",
        "adapter=udta",
        "reduction=prune",
        "reduction.rate=0.5",
        "base.width=0.1",
        f"base.checkpoint={base}",
        "data.batch_size=8",
        "trainer.max_epochs=6",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "seed=7",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def resume_base(tmp_path_factory, cifar_root) -> Path:
    tmp = tmp_path_factory.mktemp("resume_base")
    base = tmp / "base.pt"
    done = cli(
        tmp,
        "data=cifar5_5",
        f"data.root={cifar_root / 'cifar10'}",
        "task=pretrain",
        "adapter=full_finetune",
        "base.width=0.1",
        f"base.save_to={base}",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={tmp / 'pretrain'}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return base


@pytest.mark.integration  # a process killed mid-epoch
@pytest.mark.parametrize("threads", [1, 2])  # issue 23: a run repeats bit for bit at any given thread count
def test_killed_run_resumes_to_the_same_metrics(tmp_path, cifar_root, resume_base, threads):
    straight = cli(tmp_path, *resume_args(cifar_root, tmp_path / "straight", resume_base, f"threads={threads}"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = json.loads((tmp_path / "straight" / "metrics.json").read_text())

    # kill (SIGKILL) in the middle of epoch 2 or 3: after the epoch-1 checkpoint, before the end
    run_dir = tmp_path / "killed"
    killed_args = resume_args(cifar_root, run_dir, resume_base, f"threads={threads}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnn_adapt", *killed_args],
        cwd=REPO_ROOT,
        env=environment(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_file() and torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()

    resumed = cli(tmp_path, *resume_args(cifar_root, run_dir, resume_base, f"threads={threads}", "resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((run_dir / "metrics.json").read_text())
    assert outcome(got) == outcome(expected)
    assert got["environment"]["threads"] == expected["environment"]["threads"] == threads
    # pruning held across the restart and the CSV log covers every epoch once
    csv_epochs = [line.split(",") for line in (run_dir / "csv" / "metrics.csv").read_text().splitlines()]
    header = csv_epochs[0]
    epochs = {row[header.index("epoch")] for row in csv_epochs[1:] if row[header.index("epoch")]}
    assert epochs == {str(e) for e in range(6)}


def test_resume_finds_the_unfinished_single_run_by_config(make_cfg, tmp_path, pretrained_base):
    from bnn_adapt.run import resume

    first = make_cfg("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=1", name="runs/first")
    task.run(first)
    # make it look killed: drop its results, keep its checkpoint
    (tmp_path / "runs" / "first" / "metrics.json").unlink()
    first_hash = config_hash(without_hydra_node(first))
    found = resume.find_resumable(tmp_path / "runs" / "second", tmp_path / "runs", first_hash)
    assert found == tmp_path / "runs" / "first"
    other = make_cfg("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=2", name="runs/third")
    other_hash = config_hash(without_hydra_node(other))
    assert resume.find_resumable(tmp_path / "runs" / "third", tmp_path / "runs", other_hash) is None


def test_rerun_skips_a_complete_run(make_cfg, pretrained_base):
    cfg = make_cfg("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=1")
    first = task.run(cfg)
    stamp = (Path(cfg.paths.output_dir) / "metrics.json").stat().st_mtime_ns
    again = task.run(cfg)
    assert again["config_hash"] == first["config_hash"] and again["test_top1"] == first["test_top1"]
    assert (Path(cfg.paths.output_dir) / "metrics.json").stat().st_mtime_ns == stamp
    changed = make_cfg("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=2")
    assert task.run(changed)["epochs_run"] == 2


# ------------------------------------------------------------------ failure isolation and integrity


def test_diverging_run_is_recorded_as_failed(make_cfg, pretrained_base, monkeypatch):
    from bnn_adapt.training.module import Classifier

    step = Classifier._step

    def diverging(self, batch, stage, accuracy):  # the loss explodes in the second epoch
        loss = step(self, batch, stage, accuracy)
        return loss * float("nan") if self.current_epoch == 1 else loss

    monkeypatch.setattr(Classifier, "_step", diverging)
    cfg = make_cfg("data=cifar5_5", "adapter=udta", "trainer.max_epochs=3")
    with pytest.raises(TrainingDiverged, match="optimizer.lr"):
        task.run(cfg)
    failed = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert failed["status"] == "failed" and "TrainingDiverged" in failed["error"] and "epoch 1" in failed["error"]


def test_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    done = cli(
        tmp_path, "--multirun", "summary_only=true", "adapter.groups=3,1", "base.width=0.1", f"hydra.sweep.dir={sweep}"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the sweep goes on" in done.stderr
    assert json.loads((sweep / "1" / "summary.json").read_text())["adapter_fp32_params"] > 0


def test_training_job_failure_recorded_in_sweep(tmp_path, data_dir, pretrained_base):
    sweep = tmp_path / "sweep"
    missing = tmp_path / "no_such_data"
    done = cli(
        tmp_path,
        "--multirun",
        "data=cifar5_5",
        f"data.root={missing},{data_dir / 'cifar10'}",
        "adapter=head_only",
        "base.width=0.1",
        f"base.checkpoint={pretrained_base['checkpoint']}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.accelerator=cpu",
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    failed = json.loads((sweep / "0" / "metrics.json").read_text())
    ok = json.loads((sweep / "1" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "DataError" in failed["error"] and str(missing) in failed["error"]
    assert ok["status"] == "complete" and ok["test_top1"] is not None


def test_result_files_are_replaced_atomically(tmp_path):
    path = write_json(tmp_path / "metrics.json", {"test_top1": 0.5})

    class Unprintable:
        def __str__(self):
            raise RuntimeError("serialisation fails half way")

    with pytest.raises(RuntimeError):
        write_json(path, {"a": 1, "b": Unprintable()})
    assert json.loads(path.read_text()) == {"test_top1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("threads", [1, 2])  # issue 23: a run repeats bit for bit at any given thread count
def test_same_seed_same_metrics(make_cfg, pretrained_base, threads):
    runs = [
        task.run(make_cfg("data=cifar5_5", "adapter=serial", "seed=3", f"threads={threads}", name=f"run{i}"))
        for i in range(2)
    ]
    assert outcome(runs[0]) == outcome(runs[1])
    assert runs[0]["environment"]["threads"] == threads


def test_a_retrained_base_makes_a_complete_run_stale(make_cfg, pretrained_base, tmp_path, capsys):
    """Same config, same path, other base weights: the run is repeated, not skipped."""
    checkpoint = tmp_path / "base.pt"
    shutil.copy(pretrained_base["checkpoint"], checkpoint)
    cfg = make_cfg("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=1", f"base.checkpoint={checkpoint}")
    first = task.run(cfg)
    assert first["base_checkpoint_sha256"] == file_sha256(checkpoint)
    stamp = (Path(cfg.paths.output_dir) / "metrics.json").stat().st_mtime_ns
    task.run(cfg)
    assert (Path(cfg.paths.output_dir) / "metrics.json").stat().st_mtime_ns == stamp  # skipped
    saved = torch.load(checkpoint, weights_only=False)
    state = saved["state_dict"] if "state_dict" in saved else saved
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[name] = -state[name]  # "retrained" in place
    torch.save(saved, checkpoint)
    capsys.readouterr()
    again = task.run(cfg)
    assert "changed since the complete run" in capsys.readouterr().out
    assert (Path(cfg.paths.output_dir) / "metrics.json").stat().st_mtime_ns != stamp
    assert again["base_checkpoint_sha256"] == file_sha256(checkpoint) != first["base_checkpoint_sha256"]
