"""The Optuna search's trials: who runs each one, its heartbeat, and failing those a killed search left RUNNING.

Hydra's Optuna sweeper asks for a trial, runs it and tells Optuna the result;
a search killed with SIGKILL in between leaves that trial RUNNING in
``optuna.db`` for ever, and it would count in every later look at the study.
So each trial records its owner (the sweeper process, as
:mod:`bnn_adapt.run.claims` describes processes) as a system attribute, and a
heartbeat thread refreshes a timestamp beside it while it runs. When a search
starts on a stored study (:func:`fail_stale_trials`, from
:class:`bnn_adapt.tools.pareto.ParetoFrontReport`), a RUNNING trial is marked
failed when its owner is gone: on this machine the pid says so at once; from
another machine, when its heartbeat is older than ``STALE_AFTER_S``. Trials
written before owners were recorded have neither: they are failed once older
than ``LEGACY_AFTER_S``.

This is the equivalent of Optuna's own heartbeat (``RDBStorage(heartbeat_interval=...)``
with ``optuna.storages.fail_stale_trials``), which optuna 2.10.1 (pinned by
hydra-optuna-sweeper) beats only inside ``study.optimize``, not for the
ask-and-tell trials of Hydra's sweeper, and whose check reads
``timedelta.seconds``, so that a trial silent for a day and a minute looks a
minute old.
"""

from __future__ import annotations

import datetime
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bnn_adapt.run.claims import describe, owner_gone, this_process

OWNER_ATTR = "bnn_adapt:owner"
ALIVE_ATTR = "bnn_adapt:alive_at"  # time.time() of the last heartbeat
WHY_ATTR = "bnn_adapt:failed_because"
HEARTBEAT_S = 30
STALE_AFTER_S = 300  # no heartbeat for this long (another machine): the search that ran the trial is gone
LEGACY_AFTER_S = 60  # a RUNNING trial without an owner (written before owners were recorded) older than this


class _Heartbeat:
    """One daemon thread per sweeper process, beating for every trial it runs until Optuna is told its result."""

    def __init__(self) -> None:
        self.trials: dict[int, object] = {}  # trial id -> storage
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def watch(self, trial: optuna.trial.Trial) -> None:
        trial.set_system_attr(OWNER_ATTR, this_process())
        trial.set_system_attr(ALIVE_ATTR, time.time())
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


def _sqlite_file(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def fail_stale_trials(url: str, study_name: str) -> list[str]:
    """Mark failed the RUNNING trials of a stored study whose search is gone; returns a line for each."""
    db = _sqlite_file(url)
    if db is not None and not db.is_file():
        return []
    try:
        study = optuna.load_study(study_name=study_name, storage=url)
    except KeyError:  # no such study yet
        return []
    now = datetime.datetime.now()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner, alive_at = trial.system_attrs.get(OWNER_ATTR), trial.system_attrs.get(ALIVE_ATTR)
        if owner is None:
            gone = (now - (trial.datetime_start or now)).total_seconds() > LEGACY_AFTER_S
            why = "left RUNNING by a search that recorded no owner"
        else:
            gone = owner_gone(owner, time.time() - alive_at if alive_at else None, STALE_AFTER_S)
            why = f"its search ({describe(owner)}) is gone"
        if gone:
            study._storage.set_trial_system_attr(trial._trial_id, WHY_ATTR, why)
            study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
            failed.append(f"trial {trial.number}: {why}")
    return failed


def trial_counts(url: str, study_name: str) -> dict[str, int]:
    """How many trials of the stored study are in each state (``{"COMPLETE": 12, "FAIL": 1}``)."""
    db = _sqlite_file(url)
    if db is not None and not db.is_file():
        return {}
    try:
        study = optuna.load_study(study_name=study_name, storage=url)
    except KeyError:
        return {}
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts
