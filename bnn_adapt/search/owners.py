"""The Optuna search's trials: who runs each one, its heartbeat, and failing those a killed worker left RUNNING.

Hydra's Optuna sweeper asks for a trial, runs it and tells Optuna the result;
a worker killed with SIGKILL in between leaves that trial RUNNING in the study
for ever, and it would count in every later look at it. So each trial records
its owner (the sweeper process, as :mod:`bnn_adapt.run.claims` describes
processes) as a system attribute, and a heartbeat thread refreshes a timestamp
beside it while it runs. When a worker starts on a stored study, and whenever it
asks for its next trial (:func:`fail_stale`, from
:class:`bnn_adapt.search.pareto.ParetoFrontReport` and
:func:`bnn_adapt.search.pareto.search_space`), a RUNNING trial is marked failed
when its owner is gone: on this machine the pid says so at once; from another
machine, when its heartbeat is older than ``STALE_AFTER_S``. Trials written
before owners were recorded have neither: they are failed once older than
``LEGACY_AFTER_S``. The records are system attributes, which every storage
keeps (SQLite, journal file, PostgreSQL).

Optuna's own heartbeat (``RDBStorage(heartbeat_interval=...)`` with
``optuna.storages.fail_stale_trials``) does not apply: Optuna 5 beats only
inside ``study.optimize``, not for the ask-and-tell trials of Hydra's sweeper,
and its journal storage has no heartbeat at all.
"""

from __future__ import annotations

import datetime
import threading
import time

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from bnn_adapt.run.claims import describe, owner_gone, this_process
from bnn_adapt.search import study
from bnn_adapt.search.study import PRUNED_ATTR

OWNER_ATTR = "bnn_adapt:owner"
ALIVE_ATTR = "bnn_adapt:alive_at"  # time.time() of the last heartbeat
WHY_ATTR = "bnn_adapt:failed_because"
HEARTBEAT_S = 30
STALE_AFTER_S = 300  # no heartbeat for this long (another machine): the search that ran the trial is gone
LEGACY_AFTER_S = 60  # a RUNNING trial without an owner (written before owners were recorded) older than this


class _Heartbeat:
    """One daemon thread per sweeper process, beating for every trial it runs until Optuna is told its result."""

    def __init__(self) -> None:
        self.trials: dict[int, BaseStorage] = {}  # trial id -> storage
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def watch(self, trial: optuna.trial.Trial) -> None:
        trial.storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, this_process())
        trial.storage.set_trial_system_attr(trial._trial_id, ALIVE_ATTR, time.time())
        with self.lock:
            self.trials[trial._trial_id] = trial.storage
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="optuna trial heartbeat", daemon=True)
                self.thread.start()

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                watched = list(self.trials.items())
            for trial_id, storage in watched:
                try:
                    if storage.get_trial(trial_id).state.is_finished():
                        with self.lock:
                            self.trials.pop(trial_id, None)
                    else:
                        storage.set_trial_system_attr(trial_id, ALIVE_ATTR, time.time())
                except Exception:  # noqa: BLE001,S112 - a missed beat is retried; the search must go on
                    continue
            with self.lock:
                if not self.trials:
                    self.thread = None
                    return


HEARTBEAT = _Heartbeat()


def watch(trial: optuna.trial.Trial) -> None:
    """Record who runs ``trial`` and keep its heartbeat while it runs (the sweeper's per-trial hook)."""
    HEARTBEAT.watch(trial)


def fail_stale(storage: BaseStorage, study_id: int) -> list[str]:
    """Mark failed the RUNNING trials of a study whose worker is gone; returns a line for each."""
    now = datetime.datetime.now()
    failed = []
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        owner, alive_at = trial.system_attrs.get(OWNER_ATTR), trial.system_attrs.get(ALIVE_ATTR)
        if owner is None:
            gone = (now - (trial.datetime_start or now)).total_seconds() > LEGACY_AFTER_S
            why = "left RUNNING by a search that recorded no owner"
        else:
            gone = owner_gone(owner, time.time() - alive_at if alive_at else None, STALE_AFTER_S)
            why = f"its search ({describe(owner)}) is gone"
        if gone:
            try:
                storage.set_trial_system_attr(trial._trial_id, WHY_ATTR, why)
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # another worker failed it first
                continue
            failed.append(f"trial {trial.number}: {why}")
    return failed


def _stored_study(spec: str, study_name: str) -> tuple[BaseStorage, int] | None:
    if not study.stored(spec):
        return None
    storage = study.open_storage(spec)
    try:
        return storage, storage.get_study_id_from_name(study_name)
    except KeyError:  # no such study yet
        return None


def fail_stale_trials(spec: str, study_name: str) -> list[str]:
    """:func:`fail_stale` on the study ``study_name`` in the storage ``spec`` (a URL or a journal file)."""
    found = _stored_study(spec, study_name)
    return fail_stale(*found) if found else []


def trial_counts(spec: str, study_name: str) -> dict[str, int]:
    """How many trials of the stored study are in each state (``{"COMPLETE": 12, "FAIL": 1}``); a
    pruned trial, which the sweeper stores as failed, counts as PRUNED."""
    found = _stored_study(spec, study_name)
    if not found:
        return {}
    counts: dict[str, int] = {}
    for trial in found[0].get_all_trials(found[1], deepcopy=False):
        state = "PRUNED" if PRUNED_ATTR in trial.system_attrs else trial.state.name
        counts[state] = counts.get(state, 0) + 1
    return counts
