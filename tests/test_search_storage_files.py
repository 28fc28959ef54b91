"""A search's storage files as workers leave them: a journal whose last record was torn (a worker killed
mid-append, a full disk), a hand-edited journal line, and a storage path that cannot be created."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from bnn_adapt.errors import UserError
from bnn_adapt.run.config import compose
from bnn_adapt.search import study
from bnn_adapt.search.pareto import ParetoFrontReport

TORN = b'{"op_code":4,"worker_id":"w","study_id":0,"datetime_st'  # a record cut before its newline


def journal_of_a_study(path: Path, trials: int = 3) -> bytes:
    """A journal written by a real study of ``trials`` finished trials; its bytes."""
    shared = optuna.create_study(study_name="s", storage=study.open_storage(str(path)), directions=["maximize"])
    for k in range(trials):
        shared.tell(shared.ask(), k / 10)
    return path.read_bytes()


def values(storage) -> list[float]:
    return [t.value for t in optuna.load_study(study_name="s", storage=storage).trials]


def test_a_torn_last_record_is_dropped_with_a_warning_and_the_study_goes_on(tmp_path, caplog):
    path = tmp_path / "study.log"
    intact = journal_of_a_study(path)
    path.write_bytes(intact + TORN)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bnn_adapt.search.study"):
        storage = study.open_storage(str(path))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"{path}: dropped its torn last record ({len(TORN)} bytes without a newline, left by a worker stopped while "
        "writing it)"
    ]
    assert path.read_bytes() == intact
    shared = optuna.load_study(study_name="s", storage=storage)
    shared.tell(shared.ask(), 0.9)
    assert values(study.open_storage(str(path))) == [0.0, 0.1, 0.2, 0.9]
    assert values(JournalStorage(JournalFileBackend(str(path)))) == [0.0, 0.1, 0.2, 0.9]  # as optuna-dashboard reads


def test_the_torn_record_is_dropped_under_optunas_journal_lock(tmp_path, monkeypatch, caplog):
    path = tmp_path / "study.log"
    intact = journal_of_a_study(path)
    lock_file = Path(f"{path}.lock")  # what every JournalFileBackend of this file locks, optuna-dashboard's too

    # bytes without a newline while another worker holds the lock are its append in progress: kept
    finishing = intact + TORN + b'art":"2020-01-01T00:00:00"}\n'
    real_acquire = JournalFileSymlinkLock.acquire

    def acquire_after_the_other_worker(self):
        path.write_bytes(finishing)  # the other worker completes its record, then releases the lock
        return real_acquire(self)

    path.write_bytes(intact + TORN)
    monkeypatch.setattr(JournalFileSymlinkLock, "acquire", acquire_after_the_other_worker)
    with caplog.at_level(logging.WARNING, logger="bnn_adapt.search.study"):
        study.open_storage(str(path))
    assert path.read_bytes() == finishing and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    monkeypatch.setattr(JournalFileSymlinkLock, "acquire", real_acquire)

    # bytes without a newline once the lock is held are torn: dropped while holding it
    held = []
    real_truncate = os.truncate
    monkeypatch.setattr(os, "truncate", lambda p, n: (held.append(lock_file.is_symlink()), real_truncate(p, n)))
    path.write_bytes(intact + TORN)
    study.open_storage(str(path))
    assert held == [True] and path.read_bytes() == intact and not lock_file.exists()


def test_a_torn_record_that_cannot_be_dropped_is_refused_with_the_command_that_drops_it(tmp_path, monkeypatch):
    path = tmp_path / "study.log"
    intact = journal_of_a_study(path)
    path.write_bytes(intact + TORN)

    def read_only(p, n):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))

    monkeypatch.setattr(os, "truncate", read_only)
    with pytest.raises(UserError) as refused:
        study.open_storage(str(path))
    assert str(refused.value) == (
        f"the study journal {path} ends in a torn record ({len(TORN)} bytes without a newline) that cannot be "
        f"dropped here (Read-only file system (EROFS)): drop it with `truncate -s {len(intact)} {path}`"
    )
    assert path.read_bytes() == intact + TORN and not Path(f"{path}.lock").exists()


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (b"not json\n", r"no JSON \(Expecting value at column 1\)"),
        (TORN + b'{"op_code":0}\n', r"no JSON \(Expecting ':' delimiter at column 57\)"),  # appended onto a torn one
        (b'{"op_code": 99, "worker_id": "w"}\n', r"no record Optuna can replay \(AssertionError: "),
        (b'{"op_code": 4, "worker_id": "w", "study_id": 0}\n', r"no record Optuna can replay \(KeyError: "),
        (b"[4]\n", r"no record Optuna can replay \(TypeError: "),
    ],
    ids=["not-json", "appended-onto-torn", "unknown-operation", "missing-field", "not-a-record"],
)
@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_bad_journal_line_is_one_line_naming_it(tmp_path, bad, why, where):
    path = tmp_path / "study.log"
    lines = journal_of_a_study(path).splitlines(keepends=True)
    at = 2 if where == "middle" else len(lines)  # Optuna itself reads past a bad last line, until one follows it
    path.write_bytes(b"".join([*lines[:at], bad, *lines[at:]]))
    refused = rf"^the study journal {path} has a bad line {at + 1}: {why}.*; fix or delete that line, or move "
    with pytest.raises(UserError, match=refused + "the file away to start a new study$"):
        study.open_storage(str(path))


def start_search(tmp_path: Path, storage: str) -> None:
    """What ``python -m bnn_adapt ... hparams_search=size_vs_accuracy search.storage=...`` runs before Hydra
    resolves the sweeper's storage: the search's callback."""
    search = ["+experiment=digits5_5", "+profile=smoke", "hparams_search=size_vs_accuracy", f"search.storage={storage}"]
    cfg = compose([*search, f"paths.log_dir={tmp_path / 'outputs'}"], return_hydra_config=True)
    ParetoFrontReport().on_multirun_start(cfg)


@pytest.mark.parametrize("kind", ["journal", "journal-deeper", "sqlite"])
def test_a_storage_path_that_cannot_be_created_is_one_line(tmp_path, capsys, kind):
    (tmp_path / "a_file").write_text("")
    storage = {
        "journal": f"{tmp_path}/a_file/study.log",
        "journal-deeper": f"{tmp_path}/a_file/x/study.log",
        "sqlite": f"sqlite:///{tmp_path}/a_file/optuna.db",
    }[kind]
    with pytest.raises(SystemExit) as stopped:
        start_search(tmp_path, storage)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: cannot create the study storage {storage.removeprefix('sqlite:///')}: {tmp_path}/a_file is a file, "
        "not a folder; give search.storage a path in a folder this user can write"
    ]


def test_a_journal_path_that_is_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "study.log").mkdir()
    with pytest.raises(SystemExit) as stopped:
        start_search(tmp_path, str(tmp_path / "study.log"))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: cannot open the study storage {tmp_path}/study.log: Is a directory (EISDIR)"
    ]
