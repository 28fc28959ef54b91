"""The thesis's protocol (docs/thesis.md) and the clean one: pretraining keeps its best-test-accuracy epoch,
``base.epoch=best`` adapts it, the table sweeps run the thesis's protocol by default and
``protocol=clean`` runs into directories of its own while the bases stay shared; table 6.1's fp32
reference is BinaryNet.pytorch's CIFAR ResNet."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import torch

from bnn_adapt.bases import BASES, ResNetCIFAR, STEResNetCIFAR
from bnn_adapt.bases.checkpoint import best_epoch_path
from bnn_adapt.errors import CheckpointError
from bnn_adapt.run import task
from bnn_adapt.run.results import file_sha256
from bnn_adapt.thesis import table_runs
from bnn_adapt.thesis.table_runs import TABLES, table_rows
from bnn_adapt.training.best_epoch import KeepBestEpoch

pytestmark = pytest.mark.usefixtures("composed_once")  # each thesis-table job composed once a session

# ------------------------------------------------------------------ the best epoch of pretraining


def test_keep_best_epoch_stores_the_first_best_epoch_and_its_weights(tmp_path):
    base = STEResNetCIFAR(num_classes=5, width=0.1)
    keep = KeepBestEpoch(tmp_path / "base_best.pt", {"image_size": 32})
    module = SimpleNamespace(model=base)
    stored = {}
    for epoch, acc in enumerate([0.5, 0.7, 0.6, 0.7]):
        with torch.no_grad():
            base.stem[0].weight.fill_(epoch / 10)  # this epoch's weights
        trainer = SimpleNamespace(
            callback_metrics={"val/acc": torch.tensor(acc)},
            sanity_checking=False,
            current_epoch=epoch,
            is_global_zero=True,
        )
        keep.on_validation_end(trainer, module)
        stored[epoch] = torch.load(tmp_path / "base_best.pt", weights_only=False)
    assert (keep.best, keep.epoch) == (pytest.approx(0.7), 1)  # a later tie does not replace it
    assert stored[3]["epoch"] == 1 and stored[3]["top1"] == pytest.approx(0.7) and stored[3]["image_size"] == 32
    assert torch.all(stored[3]["state_dict"]["stem.0.weight"] == 0.1)
    sanity = SimpleNamespace(
        callback_metrics={"val/acc": torch.tensor(1.0)}, sanity_checking=True, current_epoch=0, is_global_zero=True
    )
    keep.on_validation_end(sanity, module)
    assert keep.epoch == 1  # sanity-check validation is not an epoch
    restored = KeepBestEpoch(tmp_path / "base_best.pt")
    restored.load_state_dict(keep.state_dict())  # rides in Lightning's checkpoint: resume carries on
    assert (restored.best, restored.epoch) == (keep.best, keep.epoch)


def test_pretraining_writes_its_best_epoch_and_base_epoch_best_adapts_it(pretrained_base, make_cfg, capsys):
    last = pretrained_base["checkpoint"]
    best = best_epoch_path(last)
    metrics = pretrained_base["metrics"]
    accs = [h["val/acc"] for h in metrics["history"]]
    assert metrics["best_epoch"] == accs.index(max(accs)) and metrics["best_epoch_checkpoint"] == str(best)
    stored = torch.load(best, weights_only=False)
    assert stored["epoch"] == metrics["best_epoch"] and stored["top1"] == pytest.approx(max(accs))

    adapted = task.run(
        make_cfg("data=cifar5_5", "adapter=head_only", "base.epoch=best", "trainer.max_epochs=1", name="adapt_best")
    )
    assert adapted["base_checkpoint_sha256"] == file_sha256(best)
    assert adapted["config"]["base"]["epoch"] == "best"


def test_a_missing_best_epoch_is_one_clear_error_and_pretraining_runs_again(make_cfg, tmp_path, capsys):
    cfg = make_cfg(
        "data=cifar5_5",
        "task=pretrain",
        "adapter=full_finetune",
        "trainer.max_epochs=1",
        name="pretrain",
        base_dir=tmp_path / "bases",
    )
    task.run(cfg)
    best = best_epoch_path(cfg.base.save_to)
    best.unlink()
    adapt = make_cfg("data=cifar5_5", "adapter=head_only", "base.epoch=best", name="adapt", base_dir=tmp_path / "bases")
    with pytest.raises(
        CheckpointError, match=r"_best\.pt does not exist; base\.epoch=best reads the best-test-accuracy"
    ):
        task.run(adapt)
    capsys.readouterr()
    task.run(cfg)  # the complete pretraining run left no best epoch: it runs again
    assert "running it again" in capsys.readouterr().out and best.is_file()
    task.run(cfg)
    assert "already complete" in capsys.readouterr().out


# ------------------------------------------------------------------ protocol=thesis (default) and protocol=clean


def test_table_sweeps_run_the_thesis_protocol_and_clean_runs_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path))
    thesis = table_rows(TABLES["6.5"], "smoke")
    clean = table_rows(TABLES["6.5"], "smoke", ["protocol=clean"])
    for row in thesis:
        (job,) = row.jobs
        assert (job.cfg.base.bn, job.cfg.base.epoch, job.cfg.protocol.name) == ("adapt", "best", "thesis")
    for a, b in zip(thesis, clean, strict=True):
        assert (b.jobs[0].cfg.base.bn, b.jobs[0].cfg.base.epoch) == ("frozen", "last")
        assert b.jobs[0].run_dir.name == f"protocol=clean,{a.jobs[0].run_dir.name}"
        assert a.key == b.key and a.label == b.label  # the same thesis row either way
        assert a.jobs[0].config_hash != b.jobs[0].config_hash
    # the bases a table adapts are pretrained once for every protocol: same directories, same configs
    for table in ("6.1", "5.2"):
        same = table_rows(TABLES[table], "smoke"), table_rows(TABLES[table], "smoke", ["protocol=clean"])
        assert [j.run_dir for r in same[0] for j in r.jobs] == [j.run_dir for r in same[1] for j in r.jobs]


def test_the_sweeps_a_table_needs_first_run_without_the_protocol(monkeypatch):
    commands = []
    monkeypatch.setattr(
        subprocess, "run", lambda command, **kw: commands.append(command) or SimpleNamespace(returncode=0)
    )
    table_runs.run_sweeps(TABLES["6.2"], "smoke", ["protocol=clean", "trainer.max_epochs=2"])
    (base, own) = commands
    assert "table_6_1" in base and "base=ste_resnet_cifar" in base and "protocol=clean" not in base
    assert "table_6_2" in own and "protocol=clean" in own and "trainer.max_epochs=2" in base + own


# ------------------------------------------------------------------ table 6.1's fp32 reference


def test_fp32_reference_is_binarynet_pytorchs_cifar_resnet():
    """BinaryNet.pytorch's resnet(dataset='cifar10', depth=18): 3x3 stem to 16 channels, 3 stages of
    2 basic blocks with 16/32/64 channels, 1x1-conv shortcuts, fp32 linear 64 -> C."""
    net = ResNetCIFAR(num_classes=5)
    assert BASES["resnet_cifar"] is ResNetCIFAR and net.stage_channels == [16, 32, 64]
    assert [len(stage) for stage in net.stages] == [2, 2, 2]
    stem = 3 * 16 * 9 + 2 * 16
    stage1 = 2 * (2 * 16 * 16 * 9 + 4 * 16)
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 4 * 32 + 16 * 32 + 2 * 32) + (2 * 32 * 32 * 9 + 4 * 32)
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 4 * 64 + 32 * 64 + 2 * 64) + (2 * 64 * 64 * 9 + 4 * 64)
    assert sum(p.numel() for p in net.parameters()) == stem + stage1 + stage2 + stage3 + 64 * 5 + 5 == 174_933
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert ResNetCIFAR(num_classes=5, width=0.25).stage_channels == [4, 8, 16]
