"""The Optuna study that a search's workers share: its storage, and the trial each job runs.

``search.storage`` names any Optuna storage (optuna.readthedocs.io, "Storages"):

- ``sqlite:///PATH.db``, the default (``optuna.db`` in the sweep directory): one worker;
- ``PATH.log``, a journal file (``JournalStorage(JournalFileBackend(PATH))``): several processes
  on one machine or on a shared file system; ``optuna-dashboard PATH.log`` opens it. A record that a
  worker left torn (killed mid-append, disk full) is dropped with a warning before anything is appended
  after it (:class:`TornRecordLock`); a record Optuna cannot replay stops the search with its line number;
- another database URL (``postgresql://user@host/db``): workers on any machine that reaches it.

hydra-optuna-sweeper passes ``hydra.sweeper.storage`` to ``optuna.create_study`` as it is, and
Optuna reads a string as a database URL only; so the search sets it to
``${optuna_storage:${search.storage}}``, whose resolver (:func:`open_storage`) gives the sweeper the
storage object. (Hydra 1.4 refuses a job config whose ``hydra.sweeper`` differs from the sweep's,
so the setting cannot be rewritten at run time, and ``hydra.sweeper.storage`` itself stays that
interpolation: :func:`storage_setting`.)

A job of the search knows its trial by ``search.trial`` (the number that
:func:`bnn_adapt.search.pareto.search_space` hands to each job), ``search.storage`` and
``search.study``; it reports to it (:class:`bnn_adapt.search.trial_report.TrialReport`), and a
configuration that another trial has already trained is not trained again (:func:`finished_twin`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shlex
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.storages.journal._storage import JournalStorageReplayResult

from bnn_adapt.errors import ConfigError, UserError, printable
from bnn_adapt.run.record import RunRecord, completed

JOURNAL_SUFFIX = ".log"
SIZE_ATTR = "bnn_adapt:size_pct"  # a trial's system attributes: its size (% of the base), known before it trains,
PRUNED_ATTR = "bnn_adapt:pruned_after_epoch"  # and after which epoch it was pruned (bnn_adapt.search.trial_report)
TAIL_CHUNK = 1 << 14  # a journal's end is read backwards in chunks of this size
LAST_RECORD_CHECKED = 1 << 20  # a last record up to this size is checked to be JSON on open

log = logging.getLogger(__name__)


def is_journal(spec: str) -> bool:
    return "://" not in spec and spec.endswith(JOURNAL_SUFFIX)


def shown(spec: str) -> str:
    """The storage as messages show it: a database URL without its password."""
    if "://" not in spec:
        return spec
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    try:
        return make_url(spec).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given
        return spec


def open_storage(spec: str) -> BaseStorage:
    """The Optuna storage that ``spec`` names (a journal file, an SQLite file or a database URL).

    A study written by an older Optuna (2.x SQLite files) is refused with the command that upgrades
    it: the upgrade is one-way, so it is the user's call.
    """
    spec = str(spec)
    if is_journal(spec):
        return _journal_storage(Path(spec).absolute())
    if "://" not in spec:
        raise ConfigError(
            f"search.storage={spec} is no Optuna storage: give a journal file (PATH{JOURNAL_SUFFIX}), "
            "an SQLite file (sqlite:///PATH.db) or a database URL (postgresql://USER@HOST/DB)"
        )
    if spec.startswith("sqlite:///"):
        _make_folder(Path(spec.removeprefix("sqlite:///")).absolute())
    try:
        return _rdb_storage(spec)
    except ImportError as exc:  # Optuna re-raises the driver's ModuleNotFoundError as an ImportError
        missing = getattr(exc.__cause__, "name", None) or exc.name
        raise UserError(
            f"the study storage {shown(spec)} needs its database driver, the Python module {missing} "
            f"(postgresql://: pip install 'psycopg[binary]')"
        ) from None
    except RuntimeError as exc:
        if "storage upgrade" not in str(exc):
            raise
        found = re.search(r"set up by optuna ([\w.]+)", str(exc))
        raise UserError(
            f"the study in {shown(spec)} was written by optuna {found.group(1) if found else '(older)'}: "
            f"upgrade it once with `optuna storage upgrade --storage {spec}` (optuna "
            f"{found.group(1) if found else 'versions'} cannot read it afterwards)"
        ) from None
    except Exception as exc:  # sqlalchemy's OperationalError and kin: the database cannot be reached
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(f"cannot open the study storage {shown(spec)}: {first}") from None


def _cause(exc: OSError, path: Path) -> str:
    """An OS error in words with its errno name (EACCES, EROFS, ...) and the file it concerns if not ``path``."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return f"{exc.strerror or exc}{f' ({code})' if code else ''}{where}"


def _make_folder(path: Path) -> None:
    """The folder of the storage file ``path``, made if missing; one line when it cannot be (a file on its way,
    no permission, a read-only disk)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in path.parents if os.path.isfile(p)), None)  # False where it cannot be looked at
        raise UserError(
            f"cannot create the study storage {path}: "
            f"{f'{blocker} is a file, not a folder' if blocker else _cause(exc, path.parent)}; "
            "give search.storage a path in a folder this user can write"
        ) from None


class TornRecordLock(JournalFileSymlinkLock):
    """Optuna's journal lock (``JournalFileBackend``'s default, so it excludes every other writer of the file) that,
    once held, drops a torn last record: Optuna appends each record with its newline under this lock, so bytes after
    the last newline found while holding it are a record whose writer died (killed, disk full). Appended onto, they
    would make that line unreadable for every worker and for optuna-dashboard."""

    def __init__(self, journal: Path) -> None:
        super().__init__(str(journal))
        self.journal = journal

    def acquire(self) -> bool:
        super().acquire()
        try:
            size, _, intact = _journal_end(self.journal)
            if intact < size:
                os.truncate(self.journal, intact)
                log.warning(
                    "%s: dropped its torn last record (%d bytes without a newline, left by a worker stopped while "
                    "writing it)",
                    self.journal,
                    size - intact,
                )
        except BaseException:
            self.release()
            raise
        return True


def _journal_end(path: Path) -> tuple[int, int, int]:
    """The journal's length, and where its last complete record starts and ends (after its newline). Optuna reads the
    journal line by line, so what follows the last newline is a torn record or one being appended."""
    with open(path, "rb") as f:
        size = end = f.seek(0, os.SEEK_END)
        found: list[int] = []
        while end > 0 and len(found) < 2:
            start = max(0, end - TAIL_CHUNK)
            f.seek(start)
            chunk = f.read(end - start)
            at = len(chunk)
            while len(found) < 2 and (at := chunk.rfind(b"\n", 0, at)) >= 0:
                found.append(start + at + 1)
            end = start
    return size, found[1] if len(found) > 1 else 0, found[0] if found else 0


def _journal_storage(path: Path) -> JournalStorage:
    """Optuna's journal storage on ``path``: a torn last record dropped first (:class:`TornRecordLock`), or refused
    with the command that drops it where the file cannot be written; a record Optuna cannot replay is one line."""
    _make_folder(path)
    lock = TornRecordLock(path)
    try:
        backend = JournalFileBackend(str(path), lock_obj=lock)
        size, _, intact = _journal_end(path)
    except OSError as exc:
        raise UserError(f"cannot open the study storage {path}: {_cause(exc, path)}") from None
    if intact < size:  # torn, or another worker is appending: known once its lock is held
        try:
            lock.acquire()
            lock.release()
        except OSError as exc:
            raise UserError(
                f"the study journal {path} ends in a torn record ({size - intact} bytes without a newline) that "
                f"cannot be dropped here ({_cause(exc, path)}): "
                f"drop it with `truncate -s {intact} {shlex.quote(str(path))}`"
            ) from None
    try:
        storage = JournalStorage(backend)
        _, start, end = _journal_end(path)
        if 0 < end - start <= LAST_RECORD_CHECKED:  # Optuna reads past a last line that is no JSON, until one follows
            with open(path, "rb") as f:
                f.seek(start)
                json.loads(f.read(end - start))
    except OSError as exc:
        raise UserError(f"cannot read the study storage {path}: {_cause(exc, path)}") from None
    except Exception as exc:  # noqa: BLE001 - whatever a record makes Optuna raise; told by its line below
        raise _bad_record(path) or exc from None
    return storage


def _bad_record(path: Path) -> UserError | None:
    """The journal's first line that is no JSON, or a record Optuna cannot replay, as one line with its number."""
    replay = JournalStorageReplayResult("bnn_adapt-check-")  # a worker that wrote none of the records
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return None
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                where = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc
                what = f"no JSON ({where})"
            else:
                try:
                    replay.apply_logs([record])
                    continue
                except Exception as exc:  # noqa: BLE001 - KeyError, TypeError, AssertionError, ...
                    what = f"no record Optuna can replay ({type(exc).__name__}: {exc})"
            return UserError(
                f"the study journal {path} has a bad line {number}: {printable(what)[:200]}; fix or delete that "
                "line, or move the file away to start a new study"
            )
    return None


def _rdb_storage(spec: str, attempts: int = 5) -> RDBStorage:
    """Optuna's storage on a database. Workers that start at once on an empty database race to create
    Optuna's tables (PostgreSQL: a duplicate key in ``pg_type``); the loser finds them made on its next try."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError  # noqa: PLC0415

    # a trial may train for hours between two writes: a connection the server dropped meanwhile is reopened
    engine = {} if spec.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            return RDBStorage(spec, engine_kwargs=engine)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def stored(spec: str) -> bool:
    """Whether ``spec`` can hold a study already (a file that does not exist yet holds none)."""
    path = spec.removeprefix("sqlite:///") if spec.startswith("sqlite:///") else spec if is_journal(spec) else None
    return path is None or Path(path).is_file()


STORAGE_NODE = "${optuna_storage:${search.storage}}"


def storage_setting(config: DictConfig) -> str | None:
    """A search's storage setting (``search.storage``), checked: it opens, or the search stops with one
    line; a ``hydra.sweeper.storage`` set directly is refused with the key to use. None: no storage."""
    if config.get("search") is None:
        return None
    given = OmegaConf.to_container(config.hydra.sweeper, resolve=False).get("storage")
    if given != STORAGE_NODE:
        raise UserError(
            f"give the search's study storage as search.storage={given} (hydra.sweeper.storage follows "
            f"it: a journal file PATH{JOURNAL_SUFFIX}, sqlite:///PATH.db or a database URL)"
        )
    spec = str(config.search.storage)
    open_storage(spec)
    return spec


if not OmegaConf.has_resolver("optuna_storage"):
    OmegaConf.register_resolver("optuna_storage", lambda spec: open_storage(spec))


# ----------------------------------------------------------------------------- the job's trial


def trial_number(cfg: DictConfig) -> int | None:
    """The search trial this job runs, or None outside a search."""
    search = cfg.get("search")
    return int(search.trial) if search is not None and search.get("trial") is not None else None


def trial_ids(cfg: DictConfig) -> tuple[BaseStorage, int, int]:
    """The study's storage, the study's id in it and this job's trial id."""
    storage = open_storage(cfg.search.storage)
    study_id = storage.get_study_id_from_name(str(cfg.search.study))
    return storage, study_id, storage.get_trial_id_from_study_id_trial_number(study_id, trial_number(cfg))


def finished_twin(cfg: DictConfig, base_sha256: str | None) -> RunRecord | None:
    """The results of another trial of the search that trained this same configuration, copied into
    this trial's directory (``same_as`` names the original), with its per-epoch validation top-1 as
    this trial's intermediate values; None when there is none, or outside a search."""
    if trial_number(cfg) is None:
        return None
    out = Path(cfg.paths.output_dir)
    for path in sorted(out.parent.glob("*/metrics.json")):
        done = completed(path.parent, cfg, base_sha256) if path.parent != out else None
        if done is None or done.same_as:  # a copy points to the run that trained
            continue
        storage, _, trial_id = trial_ids(cfg)
        for epoch, top1 in done.epoch_top1():
            storage.set_trial_intermediate_value(trial_id, epoch + 1, float(top1))
        twin = dataclasses.replace(done, same_as=str(path.parent), config=OmegaConf.to_container(cfg, resolve=True))
        twin.write(out / "metrics.json")
        print(f"trial {trial_number(cfg)}: this configuration was trained by {path.parent}; its results are reused")
        return twin
    return None
