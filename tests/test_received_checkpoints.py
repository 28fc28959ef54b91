"""Checkpoints and run folders from someone else: read as data only, checked before a network is built,
and whatever is wrong with one is one line naming it (base checkpoints, the ReActNet authors' format,
pretraining's best epoch, Lightning's last.ckpt, a run folder given to ``task=export``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bnn_adapt import report
from bnn_adapt.bases import checkpoint, reactnet_checkpoint
from bnn_adapt.bases.base import rebuild
from bnn_adapt.bases.checkpoint import load_base, save_base
from bnn_adapt.bases.reactnet_checkpoint import load_reactnet_checkpoint
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.deploy.export import load_run
from bnn_adapt.errors import CheckpointError, ExportError
from bnn_adapt.run import builders
from bnn_adapt.thesis.synthetic import write_reactnet_checkpoint
from bnn_adapt.training.best_epoch import KeepBestEpoch

HOW = "pretrain it again"


class RunsCode:
    """Unpickling this runs a shell command: what a crafted ``.pt`` does under ``weights_only=False``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path: Path, marker: Path) -> Path:
    """A checkpoint-looking file whose pickle runs ``touch marker`` when loaded without weights_only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": "ste_resnet_cifar", "state_dict": {"w": RunsCode(marker)}}, path)
    return path


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


# ---------------------------------------------------------------- nothing executes


def test_a_base_checkpoint_that_runs_code_is_refused_without_running_it(tmp_path, marker):
    path = crafted(tmp_path / "base.pt", marker)
    with pytest.raises(CheckpointError) as err:
        load_base("ste_resnet_cifar", path, HOW)
    assert not marker.exists()
    one_line(err, str(path), "posix.system", "could run code")


def test_a_reactnet_checkpoint_that_runs_code_is_refused_without_running_it(tmp_path, marker):
    path = crafted(tmp_path / "model_best.pth.tar", marker)
    with pytest.raises(CheckpointError) as err:
        load_reactnet_checkpoint(path, num_classes=10, width=0.125)
    assert not marker.exists()
    one_line(err, str(path), "posix.system")


def test_a_best_epoch_file_that_runs_code_is_refused_without_running_it(make_cfg, tmp_path, marker):
    last = tmp_path / "bases" / "base.pt"
    save_base(STEResNetCIFAR(num_classes=5, width=0.1), last, image_size=32)
    best = crafted(checkpoint.best_epoch_path(last), marker)
    cfg = make_cfg("data=cifar5_5", "base.epoch=best", f"base.checkpoint={last}")
    with pytest.raises(CheckpointError) as err:
        builders.load_trained_base(cfg)  # adaptation with base.epoch=best reads <checkpoint>_best
    assert not marker.exists()
    one_line(err, str(best))
    # and pretraining's own re-read of its best epoch, when it re-estimates that epoch's BN statistics
    keep = KeepBestEpoch(best, precise=SimpleNamespace(every_epoch=False))
    keep.epoch = 0
    with pytest.raises(CheckpointError) as err:
        keep.on_train_end(SimpleNamespace(is_global_zero=True), None)
    assert not marker.exists()
    one_line(err, str(best))


def test_the_report_reads_lightning_checkpoints_as_data(pretrained_base, tmp_path, marker):
    """A real run's last.ckpt (Lightning's: loops, callbacks, optimizer) loads with weights_only; a crafted
    one is refused without running."""
    tensors = report.checkpoint_tensors(pretrained_base["output_dir"])
    assert any(name.startswith("state_dict.") for name in tensors)
    assert any(name.startswith("optimizer0.") for name in tensors)
    run = tmp_path / "received_run"
    crafted(run / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(CheckpointError) as err:
        report.checkpoint_tensors(run)
    assert not marker.exists()
    one_line(err, "last.ckpt")


# ---------------------------------------------------------------- checked before built


@pytest.fixture
def built_for_real(monkeypatch) -> list:
    """Records every network the checkpoint module builds off the meta device (shape checks build on meta)."""
    built, real = [], checkpoint.rebuild

    def guarded(arch, config):
        if torch.get_default_device().type != "meta":
            built.append((arch, config))
            if config.get("width", 1.0) > 4:
                raise AssertionError(f"built {arch} {config} before checking it")
        return real(arch, config)

    monkeypatch.setattr(checkpoint, "rebuild", guarded)
    return built


def edit_missing_arch_config(payload):
    del payload["arch_config"]


def edit_wrong_shape(payload):
    payload["state_dict"]["classifier.0.weight"] = torch.zeros(3, 7)


def edit_missing_tensor(payload):
    del payload["state_dict"]["classifier.0.bias"]


def edit_unknown_tensor(payload):
    payload["state_dict"]["extra.weight"] = torch.zeros(2)


def edit_nan(payload):
    payload["state_dict"]["classifier.0.weight"][0, 0] = float("nan")


def edit_state_not_a_dict(payload):
    payload["state_dict"] = list(payload["state_dict"].values())


def edit_width_40(payload):
    payload["arch_config"]["width"] = 40.0  # a 28 GB float network, were it built


EDITS = {
    edit_missing_arch_config: ["arch_config", "not a dict"],
    edit_wrong_shape: ["classifier.0.weight (3, 7) != (5,"],
    edit_missing_tensor: ["Missing keys: classifier.0.bias"],
    edit_unknown_tensor: ["Unexpected keys: extra.weight"],
    edit_nan: ["classifier.0.weight", "NaN"],
    edit_state_not_a_dict: ["state_dict"],
    edit_width_40: ["width=40", "0.01..4.0"],
}


@pytest.mark.parametrize("edit", list(EDITS), ids=lambda f: f.__name__.removeprefix("edit_"))
def test_a_damaged_base_checkpoint_is_one_line_before_anything_is_built(edit, tmp_path, built_for_real):
    path = tmp_path / "base.pt"
    save_base(STEResNetCIFAR(num_classes=5, width=0.1), path, image_size=32)
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_base("ste_resnet_cifar", path, HOW)
    one_line(err, str(path), *EDITS[edit])
    assert built_for_real == []


@pytest.mark.parametrize("edit", ["nan", "unknown", "wrong shape"])
def test_a_damaged_reactnet_checkpoint_is_one_line_before_anything_is_built(edit, tmp_path, monkeypatch):
    path = tmp_path / "model_best.pth.tar"
    write_reactnet_checkpoint(path, width=0.125, num_classes=10)
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    if edit == "nan":
        state["module.fc.weight"][0, 0] = float("inf")
    elif edit == "unknown":
        state["module.fc.extra"] = torch.zeros(1)
    else:
        state["module.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(payload, path)
    built = []
    monkeypatch.setattr(
        reactnet_checkpoint, "rebuild", lambda arch, config: built.append(config) or rebuild(arch, config)
    )
    with pytest.raises(CheckpointError) as err:
        load_reactnet_checkpoint(path, num_classes=10, width=0.125)
    one_line(err, str(path), {"nan": "fc.weight", "unknown": "fc.extra", "wrong shape": "conv1.weight"}[edit])
    assert built == []


# ---------------------------------------------------------------- received run folders


@pytest.fixture
def received_run(pretrained_base, tmp_path) -> tuple[Path, dict]:
    """A finished adaptation run's folder as received: its metrics.json (a full recorded config, whose base
    is the session's pretrained one), with no adapter file yet."""
    metrics = json.loads((pretrained_base["output_dir"] / "metrics.json").read_text())
    metrics.update(task="adapt", status="complete")
    run = tmp_path / "received"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run, metrics


def test_a_run_folder_without_an_adapter_file_is_one_line_and_its_checkpoint_is_never_read(received_run, marker):
    run, _ = received_run
    crafted(run / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(ExportError) as err:
        load_run(run)
    assert not marker.exists()
    one_line(err, str(run), "adapter.safetensors", "run the adaptation again")


def write_metrics(run: Path, text: str) -> None:
    (run / "metrics.json").write_text(text)


def test_a_malformed_metrics_json_is_one_line(received_run):
    run, metrics = received_run
    without_base = {**metrics, "config": {k: v for k, v in metrics["config"].items() if k != "base"}}
    unbuildable = json.loads(json.dumps(metrics))
    unbuildable["config"]["base"]["net"]["width"] = 40.0
    cases = {
        "{not json": "unreadable",
        json.dumps([metrics]): "holds a list",
        json.dumps(without_base): "base",
        json.dumps(unbuildable): "width=40",
    }
    for text, words in cases.items():
        write_metrics(run, text)
        with pytest.raises(ExportError) as err:
            load_run(run)
        one_line(err, str(run), "metrics.json", words)


def test_an_interpolation_in_a_received_config_is_refused_unresolved(received_run, monkeypatch):
    """Runs record their config resolved: ``${...}`` in a received one is never resolved (oc.env would
    read this machine's environment into paths and messages)."""
    monkeypatch.setenv("BNN_ADAPT_TEST_SECRET", "s3cret")
    run, metrics = received_run
    metrics["config"]["base"]["checkpoint"] = "/data/${oc.env:BNN_ADAPT_TEST_SECRET}/base.pt"
    write_metrics(run, json.dumps(metrics))
    with pytest.raises(ExportError) as err:
        load_run(run)
    message = one_line(err, "base.checkpoint", "interpolation")
    assert "s3cret" not in message
