"""Write errors during a run (a full or read-only disk): one line naming the path and the cause, what was
measured kept (recorded, or printed when even metrics.json cannot be written), no truncated checkpoint under
a checkpoint's name, and a damaged ``last.ckpt`` refused in one line when ``resume=true`` reads it.

The disk fills up for real, in the kernel: ``RLIMIT_FSIZE`` (with SIGXFSZ ignored) makes every write that
would grow a file past the limit fail with EFBIG, in Python, torch and Lightning alike.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
from pathlib import Path

import filelock
import pytest
import torch

from bnn_adapt.errors import CheckpointError
from bnn_adapt.files import WriteError, read_json
from bnn_adapt.run import claims, fit, records, resume, task
from bnn_adapt.run.config import without_hydra_node
from bnn_adapt.training.callbacks import RunStats
from bnn_adapt.training.module import Classifier

ADAPT = ("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=2")


@pytest.fixture
def disk_full_from():
    """``disk_full_from(nbytes)``: from now on no file of this process grows past ``nbytes`` (lifted after the test)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    yield lambda nbytes: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture
def disk_fills_at(monkeypatch, disk_full_from):
    """``disk_fills_at(hook, nbytes, epoch=None)``: the disk fills once, when RunStats' ``hook`` runs (in ``epoch``)."""

    def at(hook: str, nbytes: int, epoch: int | None = None) -> None:
        original, filled = getattr(RunStats, hook), []

        def then_full(self, trainer, *args):
            original(self, trainer, *args)
            if epoch in (None, trainer.current_epoch) and not filled:
                filled.append(disk_full_from(nbytes))

        monkeypatch.setattr(RunStats, hook, then_full)

    return at


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_the_last_whole_one(
    make_cfg, pretrained_base, disk_fills_at, disk_full_from
):
    cfg = make_cfg(*ADAPT)
    run_dir = Path(cfg.paths.output_dir)
    disk_fills_at("on_train_epoch_start", 100_000, epoch=1)  # epoch 0's checkpoint (~240 kB) fits, epoch 1's not
    with pytest.raises(WriteError) as failed:
        task.run(cfg)
    message = str(failed.value)
    assert message.startswith(f"cannot write {run_dir / 'checkpoints'}/epoch=1-"), message
    assert message.endswith(": File too large (EFBIG)") and "\n" not in message
    # no half checkpoint, no temporary file: the last one is whole and what last.ckpt names
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    assert torch.load(run_dir / resume.CHECKPOINT, weights_only=True)["epoch"] == 0
    recorded = read_json(run_dir / "metrics.json")
    assert recorded["status"] == "failed" and recorded["error"] == f"WriteError: {message}"
    assert "status" not in read_json(run_dir / resume.RUN_FILE)  # nothing that says "running" forever
    assert not claims.held_by_another(run_dir) and claims.run_claim(run_dir).holder() is None

    disk_full_from(resource.RLIM_INFINITY)  # space freed: resume=true continues from epoch 0's checkpoint
    done = task.run(make_cfg(*ADAPT, "resume=true"))
    assert done["status"] == "complete" and done["epochs_run"] == 2


def test_metrics_that_cannot_be_written_are_printed_and_resume_writes_them_without_training(
    make_cfg, pretrained_base, disk_fills_at, disk_full_from, capsys, monkeypatch
):
    cfg = make_cfg(*ADAPT)
    run_dir = Path(cfg.paths.output_dir)
    disk_fills_at("on_train_end", 8192)  # after training: the adapter file (~1 kB) fits, metrics.json (~11 kB) not
    with pytest.raises(records.FailedAfterTraining) as failed:
        task.run(cfg)
    message = str(failed.value)
    assert message.startswith(f"cannot write {run_dir / 'metrics.json'}: File too large (EFBIG); every epoch ran")
    assert "printed above" in message and "resume=true" in message and "\n" not in message
    assert not (run_dir / "metrics.json").exists()
    err = capsys.readouterr().err
    header = f"{run_dir / 'metrics.json'} could not be written; its content:\n"
    assert header in err and "note:" not in err
    printed, _ = json.JSONDecoder().raw_decode(err[err.index(header) + len(header) :])
    assert printed["status"] == "complete" and printed["epochs_run"] == 2 and printed["test_top1"] is not None

    disk_full_from(resource.RLIM_INFINITY)
    monkeypatch.setattr(Classifier, "training_step", lambda *a: pytest.fail("resume trained again"))
    done = task.run(make_cfg(*ADAPT, "resume=true"))
    same = ("status", "test_top1", "history", "epochs_run", "config_hash", "size_pct")
    assert {k: done[k] for k in same} == {k: printed[k] for k in same}
    assert read_json(run_dir / "metrics.json")["status"] == "complete"


@pytest.mark.parametrize("kind", ["adapt", "pretrain"])
def test_a_file_written_after_training_names_its_path_and_the_numbers_are_kept(
    make_cfg, pretrained_base, disk_fills_at, capsys, tmp_path, kind
):
    pretrain = kind == "pretrain"
    overrides = ("task=pretrain", "adapter=full_finetune") if pretrain else ("adapter=head_only",)
    cfg = make_cfg("data=cifar5_5", "trainer.max_epochs=1", *overrides, base_dir=tmp_path if pretrain else None)
    run_dir = Path(cfg.paths.output_dir)
    written = Path(cfg.base.save_to) if pretrain else run_dir / "adapter.safetensors"
    disk_fills_at("on_train_end", 700)  # the logs fit; the adapter file (~1 kB), the base and metrics.json not
    with pytest.raises(records.FailedAfterTraining) as failed:
        task.run(cfg)
    message = str(failed.value)
    assert f"failed after training (WriteError: cannot write {written}: File too large (EFBIG)); " in message
    assert f"printed above (cannot write {run_dir / 'metrics.json'}: File too large (EFBIG))" in message
    assert not written.exists() and not (run_dir / "metrics.json").exists()
    err = capsys.readouterr().err
    printed, _ = json.JSONDecoder().raw_decode(err[err.index("its content:\n") + len("its content:\n") :])
    assert printed["status"] == "failed_after_training" and printed["test_top1"] is not None


class RunsCode:
    """Pickled as a call to ``print``: what a crafted checkpoint runs if it is loaded as more than data."""

    def __reduce__(self):
        return print, ("loading this checkpoint ran code",)


@pytest.mark.parametrize("damage", ["truncated", "holding code"])
def test_resume_from_a_damaged_last_checkpoint_is_one_line(make_cfg, pretrained_base, damage):
    one_epoch = (*ADAPT[:2], "trainer.max_epochs=1")
    cfg = make_cfg(*one_epoch)
    task.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    last = (run_dir / resume.CHECKPOINT).resolve()
    if damage == "truncated":  # a copy cut short by a full disk
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        torch.save({**torch.load(last, weights_only=True), "payload": RunsCode()}, last)
    (run_dir / "metrics.json").unlink()  # as if killed before its results
    with pytest.raises(CheckpointError) as refused:
        task.run(make_cfg(*one_epoch, "resume=true"))
    message = str(refused.value)
    assert message.startswith(f"checkpoint {run_dir / resume.CHECKPOINT} ") and "\n" not in message
    assert "without resume=true" in message


def test_a_failure_that_cannot_be_recorded_keeps_its_own_error(make_cfg, disk_full_from, capsys):
    cfg = without_hydra_node(make_cfg(*ADAPT))
    disk_full_from(1000)  # the failure record (the whole config) is larger
    records.record_failure(cfg, RuntimeError("what went wrong first"))  # returns: the run ends with that error
    unwritten = f"cannot write {cfg.paths.output_dir}/metrics.json: File too large (EFBIG)"
    assert capsys.readouterr().err == f"note: this failure is not recorded: {unwritten}\n"
    assert not Path(cfg.paths.output_dir, "metrics.json").exists()


def test_a_claim_on_a_full_disk_still_excludes_and_leaves_no_garbled_owner(tmp_path, disk_full_from):
    disk_full_from(10)  # the owner record does not fit; the OS lock takes no bytes
    claim = claims.run_claim(tmp_path / "run").acquire()
    with pytest.raises(filelock.Timeout):
        filelock.FileLock(claim.path).acquire(timeout=0)  # another opener of the file is refused
    assert claim.holder() is None and not claim.owner_file.exists()  # no half-written owner record
    claim.release()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [claims.RUN_LOCK]  # nothing holds it


def test_a_claim_in_a_directory_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("a file where the run's parent folder should be")
    run_dir = tmp_path / "file" / "run"
    with pytest.raises(WriteError, match=f"^cannot write {run_dir / claims.RUN_LOCK}: "):
        claims.run_claim(run_dir).acquire()


def test_a_write_failing_inside_lightning_is_one_line_naming_its_path_or_the_run_directory(tmp_path):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # Lightning's CSV logger: no file name
    assert str(fit.failed_write(full, tmp_path)) == f"cannot write {tmp_path}: No space left on device (ENOSPC)"
    named = WriteError(errno.ENOSPC, f"cannot write {tmp_path / 'last.ckpt'}: No space left on device (ENOSPC)")
    try:
        try:
            raise named
        except WriteError:  # Lightning's loggers close on the same full disk, fail again and hide it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # noqa: B904
    except OSError as again:
        assert fit.failed_write(again, tmp_path) is named
    unrelated = OSError(errno.ENOENT, "No such file or directory")
    assert fit.failed_write(unrelated, tmp_path) is unrelated


def test_a_claim_on_a_disk_turned_read_only_does_not_hide_the_runs_own_error(tmp_path, monkeypatch):
    def read_only(path, missing_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    first = WriteError(errno.EROFS, f"cannot write {tmp_path}/run/metrics.json: Read-only file system (EROFS)")
    with pytest.raises(WriteError) as failed, claims.run_claim(tmp_path / "run"):
        monkeypatch.setattr(Path, "unlink", read_only)
        raise first
    assert failed.value is first
