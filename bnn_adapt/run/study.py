"""The Optuna study that a search's workers share: its storage, and the trial each job runs.

``search.storage`` names any Optuna storage (optuna.readthedocs.io, "Storages"):

- ``sqlite:///PATH.db``, the default (``optuna.db`` in the sweep directory): one worker;
- ``PATH.log``, a journal file (``JournalStorage(JournalFileBackend(PATH))``): several processes
  on one machine or on a shared file system; ``optuna-dashboard PATH.log`` opens it;
- another database URL (``postgresql://user@host/db``): workers on any machine that reaches it.

hydra-optuna-sweeper passes ``hydra.sweeper.storage`` to ``optuna.create_study`` as it is, and
Optuna reads a string as a database URL only; so the search sets it to
``${optuna_storage:${search.storage}}``, whose resolver (:func:`open_storage`) gives the sweeper the
storage object. (Hydra 1.4 refuses a job config whose ``hydra.sweeper`` differs from the sweep's,
so the setting cannot be rewritten at run time, and ``hydra.sweeper.storage`` itself stays that
interpolation: :func:`storage_setting`.)

A job of the search knows its trial by ``search.trial`` (the number that
:func:`bnn_adapt.tools.pareto.search_space` hands to each job), ``search.storage`` and
``search.study``; it reports to it (:class:`bnn_adapt.run.trial_report.TrialReport`), and a
configuration that another trial has already trained is not trained again (:func:`finished_twin`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from bnn_adapt.errors import ConfigError, UserError
from bnn_adapt.files import write_json
from bnn_adapt.run.results import completed_metrics

JOURNAL_SUFFIX = ".log"
SIZE_ATTR = "bnn_adapt:size_pct"  # a trial's system attributes: its size (% of the base), known before it trains,
PRUNED_ATTR = "bnn_adapt:pruned_after_epoch"  # and after which epoch it was pruned (bnn_adapt.run.trial_report)


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
        path = Path(spec).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in spec:
        raise ConfigError(f"search.storage={spec} is no Optuna storage: give a journal file (PATH{JOURNAL_SUFFIX}), "
                          "an SQLite file (sqlite:///PATH.db) or a database URL (postgresql://USER@HOST/DB)")
    if spec.startswith("sqlite:///"):
        Path(spec.removeprefix("sqlite:///")).absolute().parent.mkdir(parents=True, exist_ok=True)
    try:
        return _rdb_storage(spec)
    except ImportError as exc:  # Optuna re-raises the driver's ModuleNotFoundError as an ImportError
        missing = getattr(exc.__cause__, "name", None) or exc.name
        raise UserError(f"the study storage {shown(spec)} needs its database driver, the Python module {missing} "
                        f"(postgresql://: pip install 'psycopg[binary]')") from None  # fmt: skip
    except RuntimeError as exc:
        if "storage upgrade" not in str(exc):
            raise
        found = re.search(r"set up by optuna ([\w.]+)", str(exc))
        raise UserError(f"the study in {shown(spec)} was written by optuna {found.group(1) if found else '(older)'}: "
                        f"upgrade it once with `optuna storage upgrade --storage {spec}` (optuna "
                        f"{found.group(1) if found else 'versions'} cannot read it afterwards)") from None  # fmt: skip
    except Exception as exc:  # sqlalchemy's OperationalError and kin: the database cannot be reached
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(f"cannot open the study storage {shown(spec)}: {first}") from None


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
        raise UserError(f"give the search's study storage as search.storage={given} (hydra.sweeper.storage follows "
                        f"it: a journal file PATH{JOURNAL_SUFFIX}, sqlite:///PATH.db or a database URL)")  # fmt: skip
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


def finished_twin(cfg: DictConfig, base_sha256: str | None) -> dict | None:
    """The results of another trial of the search that trained this same configuration, copied into
    this trial's directory (``same_as`` names the original), with its per-epoch validation top-1 as
    this trial's intermediate values; None when there is none, or outside a search."""
    if trial_number(cfg) is None:
        return None
    out = Path(cfg.paths.output_dir)
    for path in sorted(out.parent.glob("*/metrics.json")):
        done = completed_metrics(path.parent, cfg, base_sha256) if path.parent != out else None
        if done is None or done.get("same_as"):  # a copy points to the run that trained
            continue
        storage, _, trial_id = trial_ids(cfg)
        for k, epoch in enumerate(done.get("history") or [], start=1):
            if epoch.get("val/acc") is not None:
                storage.set_trial_intermediate_value(trial_id, k, float(epoch["val/acc"]))
        twin = {**done, "same_as": str(path.parent), "config": OmegaConf.to_container(cfg, resolve=True)}
        write_json(out / "metrics.json", twin)
        print(f"trial {trial_number(cfg)}: this configuration was trained by {path.parent}; its results are reused")
        return twin
    return None

