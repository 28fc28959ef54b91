"""Many workers, one study (issue #25): the search's storages (SQLite, a journal file, PostgreSQL),
three workers at once on one study, workers killed with SIGKILL, studies written by optuna 2.10.1,
a configuration proposed twice, and trials that report their epochs and are pruned."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from bnn_adapt.errors import ConfigError, UserError
from bnn_adapt.run.config import search_as_multirun
from bnn_adapt.search import owners, study
from bnn_adapt.search.study import PRUNED_ATTR, SIZE_ATTR
from bnn_adapt.search.trial_report import TrialReport, should_prune
from tests.helpers.cli import REPO_ROOT, SEARCH, environment, run_here, run_module
from tests.helpers.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures

OLD_STUDY = Path(__file__).parent / "data" / "optuna_2_10_1_study.db.gz"
SWEEP = Path("outputs") / "pareto" / "smoke" / "digits_ste_resnet_cifar_w0.25"


def worker(root: Path, *overrides: str) -> subprocess.Popen:
    """One search worker, ``python -m bnn_adapt SEARCH OVERRIDES``, as a user starts it in a terminal."""
    return subprocess.Popen(
        [sys.executable, "-m", "bnn_adapt", *SEARCH, *overrides],
        cwd=REPO_ROOT,
        env=environment(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def load(spec: str) -> optuna.Study:
    return optuna.load_study(study_name="size_vs_accuracy", storage=study.open_storage(spec))


def storage_spec(kind: str, root: Path, request) -> str:
    if kind == "sqlite":
        return f"sqlite:///{root / SWEEP / 'optuna.db'}"
    if kind == "journal":
        return str(root / "shared" / "study.log")
    return request.getfixturevalue("postgres_url")


# ------------------------------------------------------------------ storages


def test_storages_open_and_bad_ones_are_one_line(tmp_path):
    journal = study.open_storage(str(tmp_path / "a" / "study.log"))
    assert isinstance(journal, JournalStorage) and (tmp_path / "a" / "study.log").is_file()
    optuna.create_study(study_name="s", storage=journal, directions=["maximize", "minimize"]).ask()
    reopened = JournalStorage(JournalFileBackend(str(tmp_path / "a" / "study.log")))  # what optuna-dashboard opens
    assert len(optuna.load_study(study_name="s", storage=reopened).trials) == 1
    assert isinstance(study.open_storage(f"sqlite:///{tmp_path / 'x.db'}"), optuna.storages.RDBStorage)
    with pytest.raises(ConfigError, match=r"study.txt is no Optuna storage: give a journal file \(PATH.log\)"):
        study.open_storage(str(tmp_path / "study.txt"))
    with pytest.raises(UserError, match=r"cannot open the study storage postgresql://u:\*\*\*@127.0.0.1:1/db: "):
        study.open_storage("postgresql://u:secret@127.0.0.1:1/db")  # nothing listens there; the password not shown
    with pytest.raises(UserError, match=r"needs its database driver, the Python module MySQLdb"):
        study.open_storage("mysql://u@127.0.0.1:1/db")


def test_a_search_is_a_multirun_without_the_flag():
    assert search_as_multirun(["hparams_search=size_vs_accuracy", "a=1"]) == [
        "--multirun",
        "hparams_search=size_vs_accuracy",
        "a=1",
    ]
    assert search_as_multirun(["-m", "hparams_search=x"]) == ["-m", "hparams_search=x"]
    assert search_as_multirun(["hparams_search=x", "--cfg", "job"]) == ["hparams_search=x", "--cfg", "job"]
    assert search_as_multirun(["a=1"]) == ["a=1"]
    assert search_as_multirun(["hparams_search=null"]) == ["hparams_search=null"]


def test_the_storage_is_set_through_search_storage_in_one_line(tmp_path):
    result = run_here(tmp_path, "bnn_adapt", *SEARCH, f"hydra.sweeper.storage={tmp_path / 'x.log'}")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: give the search's study storage as search.storage={tmp_path / 'x.log'} "
        "(hydra.sweeper.storage follows it: a journal file PATH.log, sqlite:///PATH.db or a "
        "database URL)"
    ]
    assert not list((tmp_path / SWEEP).glob("trial_*"))


# ------------------------------------------------------------------ three workers, one study


@pytest.mark.integration  # three processes at once
@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_three_workers_at_once_share_one_study(kind, tmp_path, request):
    spec = storage_spec(kind, tmp_path, request)
    workers = [worker(tmp_path, f"search.storage={spec}", "hydra.sweeper.n_trials=2") for _ in range(3)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (_, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stderr[-3000:]
    trials = load(spec).trials
    assert sorted(t.number for t in trials) == list(range(6))  # 3 x 2, none lost, none twice
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6  # none left RUNNING
    pids = {t.system_attrs[owners.OWNER_ATTR]["pid"] for t in trials}
    assert pids == {w.pid for w in workers}  # every worker ran trials of the shared study
    for t in trials:  # each trial in its own directory, whose results are that trial's values
        run_dir = tmp_path / SWEEP / f"trial_{t.number}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["config"]["search"]["trial"] == t.number and metrics["status"] == "complete"
        assert [metrics["val_top1"], metrics["size_pct"]] == pytest.approx(t.values)  # what the search optimises
        assert t.intermediate_values == {k + 1: pytest.approx(h["val/acc"]) for k, h in enumerate(metrics["history"])}
    assert len(list((tmp_path / SWEEP).glob("trial_*"))) == 6


@pytest.mark.integration  # two searches of three trials each at once
def test_two_workers_on_a_narrow_base_complete_every_trial(tmp_path):
    """At width 0.1 (stages of 8/16/32 channels) the thesis's group counts 5, 10 and 20 divide nothing: the search
    proposes what this base runs (bnn_adapt.search.space), so every trial it starts completes."""
    spec = str(tmp_path / "shared" / "narrow.log")
    overrides = ("base.width=0.1", f"search.storage={spec}", "hydra.sweeper.n_trials=3")
    workers = [worker(tmp_path, *overrides) for _ in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (_, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stderr[-3000:]
        assert "Failed experiment" not in stderr and "does not divide" not in stderr
    trials = load(spec).trials
    assert len(trials) == 6 and [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert {t.params["adapter.groups"] for t in trials} <= {1, 2, 4, 8, "channels"}


# ------------------------------------------------------------------ killed workers


@pytest.mark.integration  # a process killed mid-trial
@pytest.mark.parametrize("kind", ["journal", "postgresql"])  # SQLite: tests/test_reliability_round2.py
def test_a_worker_killed_mid_trial_leaves_no_running_trial_once_another_starts(kind, tmp_path, request):
    spec = storage_spec(kind, tmp_path, request)
    doomed = worker(tmp_path, f"search.storage={spec}", "trainer.max_epochs=1000", "hydra.sweeper.n_trials=1")
    deadline = time.time() + 300
    while time.time() < deadline and doomed.poll() is None and not list((tmp_path / SWEEP).glob("*/csv/metrics.csv")):
        time.sleep(0.2)
    assert doomed.poll() is None, "the worker ended before it could be killed"
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    assert [t.state for t in load(spec).trials] == [TrialState.RUNNING]

    again = run_module(tmp_path, "bnn_adapt", *SEARCH, f"search.storage={spec}", "hydra.sweeper.n_trials=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"note: marked failed, trial 0: its search (pid {doomed.pid} on host" in again.stderr
    trials = load(spec).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "is gone" in trials[0].system_attrs[owners.WHY_ATTR]


def test_a_running_worker_fails_the_trial_of_a_killed_one_when_it_asks_for_its_next(tmp_path):
    spec = str(tmp_path / "study.log")
    shared = optuna.create_study(study_name="s", storage=study.open_storage(spec), directions=["maximize", "minimize"])
    killed = shared.ask()
    for key, value in search_trials_owner(pid=dead_pid()).items():
        killed.storage.set_trial_system_attr(killed._trial_id, key, value)
    from bnn_adapt.search.pareto import search_space  # noqa: PLC0415 - the sweeper's hook, as the sweeper calls it

    search_space(OmegaConf.create({"base": {"name": "ste_resnet_cifar"}}), shared.ask())
    states = [t.state for t in optuna.load_study(study_name="s", storage=study.open_storage(spec)).trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING]
    owners.HEARTBEAT.trials.clear()


def search_trials_owner(pid: int) -> dict:
    import socket  # noqa: PLC0415

    from bnn_adapt.run import claims  # noqa: PLC0415

    owner = {"host": socket.gethostname(), "boot": claims.boot_id(), "pid": pid, "start": None, "since": time.time()}
    return {owners.OWNER_ATTR: owner, owners.ALIVE_ATTR: time.time()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ studies of optuna 2.10.1


def test_a_study_of_optuna_2_10_1_is_refused_in_one_line_and_continues_once_upgraded(tmp_path, search_root):
    db = tmp_path / SWEEP / "optuna.db"
    db.parent.mkdir(parents=True)
    with gzip.open(OLD_STUDY) as src, db.open("wb") as dst:  # 3 complete trials + 1 left RUNNING by a killed search
        shutil.copyfileobj(src, dst)
    url = f"sqlite:///{db}"
    refused = run_here(tmp_path, "bnn_adapt", *SEARCH, "hydra.sweeper.n_trials=1")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the study in {url} was written by optuna 2.10.1: upgrade it once with "
        f"`optuna storage upgrade --storage {url}` (optuna 2.10.1 cannot read it afterwards)"
    ]
    assert "Traceback" not in refused.stderr

    upgrade = subprocess.run(
        [Path(sys.executable).parent / "optuna", "storage", "upgrade", "--storage", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    again = run_here(tmp_path, "bnn_adapt", *SEARCH, "hydra.sweeper.n_trials=1")
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load(url).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]  # the killed one failed
    assert trials[0].values == pytest.approx([0.375, 8.102678918481894])  # what 2.10.1 stored, read back
    assert (tmp_path / SWEEP / "trial_4" / "metrics.json").is_file()


# ------------------------------------------------------------------ a configuration proposed twice


def test_a_configuration_proposed_again_is_not_trained_again(tmp_path, search_root):
    # every searched key fixed on the command line: the sampler can only propose this configuration
    one_point = [
        "adapter=udta",
        "adapter.groups=channels",
        "reduction=prune",
        "reduction.rate=0.5",
        "adapter.bits=8",
        "adapter.lr=0.001",
    ]
    result = run_here(tmp_path, "bnn_adapt", *SEARCH, *one_point, "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(f"sqlite:///{tmp_path / SWEEP / 'optuna.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and trials[0].values == trials[1].values
    assert trials[1].intermediate_values == trials[0].intermediate_values
    twin = json.loads((tmp_path / SWEEP / "trial_1" / "metrics.json").read_text())
    assert twin["same_as"] == str(tmp_path / SWEEP / "trial_0") and twin["config"]["search"]["trial"] == 1
    assert not (tmp_path / SWEEP / "trial_1" / "csv").exists()  # not trained
    assert len((tmp_path / SWEEP / "trials.csv").read_text().splitlines()) == 1 + 1  # one configuration


# ------------------------------------------------------------------ multi-fidelity: epochs reported, pruning


def finished(s: optuna.Study, size: float, curve: list[float]) -> None:
    """A finished trial of ``size`` whose validation top-1 went along ``curve`` (successive halving's first
    rung recorded, as when it passed there)."""
    s.add_trial(
        create_trial(
            values=[curve[-1], size],
            intermediate_values=dict(enumerate(curve, start=1)),
            system_attrs={SIZE_ATTR: size, "completed_rung_0": curve[0]},
        )
    )


def test_the_pruner_judges_a_trial_among_the_trials_no_larger_than_it(tmp_path):
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize", "minimize"])
    for size, curve in ((2.0, [0.6, 0.7, 0.8]), (3.0, [0.7, 0.8, 0.9]), (50.0, [0.1, 0.1, 0.1])):
        finished(s, size, curve)
    storage = s._storage
    ids = {}
    for name, size in (("large and behind", 10.0), ("small and behind", 1.0)):
        trial = s.ask()
        storage.set_trial_system_attr(trial._trial_id, SIZE_ATTR, size)
        storage.set_trial_intermediate_value(trial._trial_id, 1, 0.3)
        ids[name] = (trial._trial_id, size)
    median = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    # behind both smaller trials at epoch 1: cannot reach the front
    assert should_prune(median, storage, s._study_id, *ids["large and behind"])
    # nothing is smaller: on the front whatever its accuracy (Optuna's median over every trial would prune it)
    assert not should_prune(median, storage, s._study_id, *ids["small and behind"])
    halving = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    assert should_prune(halving, storage, s._study_id, *ids["large and behind"])  # not the best third of .3, .6, .7
    assert not should_prune(halving, storage, s._study_id, *ids["small and behind"])  # alone at its size
    rungs = storage.get_trial(ids["large and behind"][0]).system_attrs
    assert rungs.get("completed_rung_0") == 0.3  # what successive halving records is kept in the study


def test_a_pruned_trial_stops_after_the_epoch_and_the_search_goes_on(tmp_path, search_root):
    """The search prunes weights at the end of epoch 1 of 3 (reduction=prune, at max_epochs // 2): a trial
    is judged from epoch 2 on, the first whose top-1 is of its pruned weights, and stops after it."""
    never_good_enough = "+search.pruner={_target_:optuna.pruners.ThresholdPruner,lower:1.1}"  # top-1 never exceeds 1
    result = run_here(
        tmp_path,
        "bnn_adapt",
        *SEARCH,
        never_good_enough,
        "trainer.max_epochs=3",
        "hydra.sweeper.n_trials=2",
        "reduction=prune",
        "reduction.rate=0.5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("pruned after epoch 2") == 2, result.stdout[-3000:]
    spec = f"sqlite:///{tmp_path / SWEEP / 'optuna.db'}"
    for t in load(spec).trials:  # the sweeper tells Optuna COMPLETE or FAIL only: FAIL, with the epoch recorded
        assert t.state == TrialState.FAIL and t.system_attrs[PRUNED_ATTR] == 2 and list(t.intermediate_values) == [1, 2]
        metrics = json.loads((tmp_path / SWEEP / f"trial_{t.number}" / "metrics.json").read_text())
        assert metrics["status"] == "pruned" and metrics["pruned_after_epoch"] == 2 and metrics["epochs_run"] == 2
    assert owners.trial_counts(spec, "size_vs_accuracy") == {"PRUNED": 2}
    assert "study: 2 pruned" in result.stdout + result.stderr
    assert len((tmp_path / SWEEP / "trials.csv").read_text().splitlines()) <= 1  # no finished trial


@pytest.mark.parametrize(
    ("reduction", "first_judged"),
    [
        ({"name": "prune", "rate": 0.9, "at_epoch": None}, 4),
        ({"name": "prune", "rate": 0.0, "at_epoch": None}, 1),
        ({"name": "prune", "rate": 0.0, "head_rate": 0.5, "at_epoch": 2}, 3),
        ({"name": "none"}, 1),
    ],
)
def test_a_trial_is_judged_from_the_first_epoch_of_its_final_weights(reduction, first_judged):
    """Weights pruned at the end of epoch 3 of 6 (max_epochs // 2): judged from epoch 4; rates of 0 prune
    nothing, so such a trial is judged from its first epoch, as one without reduction."""
    rates = {"depthwise_rate": reduction.get("rate"), "pointwise_rate": reduction.get("rate")}
    cfg = OmegaConf.create(
        {
            "search": {"pruner": None},
            "optimized_metrics": ["val_top1", "size_pct"],
            "trainer": {"max_epochs": 6},
            "reduction": {**rates, **reduction},
        }
    )
    assert TrialReport(cfg, size_pct=3.0).first_judged_epoch == first_judged


def test_a_front_reaches_the_points_it_equals_and_the_epochs_of_a_search_are_counted(tmp_path):
    from bnn_adapt.files import write_json  # noqa: PLC0415
    from bnn_adapt.search.pareto import compare_fronts, epochs_trained  # noqa: PLC0415

    found = compare_fronts(
        [{"size_pct": 2.0, "val_top1": 0.7, "test_top1": 0.6}],
        [{"size_pct": 2.0, "val_top1": 0.7, "test_top1": 0.8}],
        limit=100,
    )
    assert found["baseline_points_reached"] == 1 and found["baseline_points_dominated"] == 0  # judged on validation
    for name, metrics in {
        "trial_0": {"status": "complete", "epochs_run": 6},
        "trial_1": {"status": "pruned", "epochs_run": 1},
        "trial_2": {"status": "complete", "epochs_run": 6, "same_as": "trial_0"},
    }.items():
        write_json(tmp_path / name / "metrics.json", metrics)
    assert epochs_trained(tmp_path) == 7
