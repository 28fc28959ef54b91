"""Reliability, round 2 (issue #14): a multirun that cannot succeed stops before its first job;
a killed search leaves no phantom RUNNING trial; a typed base path is never a new base; written
files get the umask's mode; two invocations of one sweep run each row once; run directories
(``row=...``) work on the command line, and export takes a sweep directory; the missing-base
line names the command (and missing data); a failed download says so, with URL and folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from bnn_adapt.errors import CheckpointError, DataError, ExportError
from bnn_adapt.files import atomic_output, write_json
from bnn_adapt.run import claims, task
from bnn_adapt.run.config import quote_path_overrides
from bnn_adapt.search import owners
from bnn_adapt.training.datamodule import ClassSplitDataModule
from tests.helpers.cli import REPO_ROOT, environment, error_lines, run_here, run_module


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ 1 + 7: stop before work, name the command


@pytest.mark.integration
def test_the_readme_search_in_a_fresh_clone_stops_before_the_first_trial(tmp_path):
    """docs/search.md's Pareto smoke command before any base (or smoke data) exists: one line, exit 2, nothing on disk."""
    result = run_module(
        tmp_path,
        "bnn_adapt",
        "+experiment=cifar5_5_serial",
        "+profile=smoke",
        "hparams_search=size_vs_accuracy",
        "hydra.sweeper.n_trials=8",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "Traceback" not in result.stderr
    assert "stops before the first trial" in line
    assert "pretrain it first with `python -m bnn_adapt +experiment=cifar5_5_base +profile=smoke`" in line
    assert "its data is missing too" in line and "cifar-10-batches-py" in line
    assert "python -m bnn_adapt.thesis.synthetic" in line  # smoke data is generated, not downloaded
    assert not (tmp_path / "outputs").exists(), "a search that cannot succeed must leave nothing behind"


def test_a_basic_multirun_none_of_whose_jobs_can_run_stops_once(tmp_path):
    result = run_here(tmp_path, "bnn_adapt", "--multirun", "+experiment=cifar80_20_udta", "adapter.groups=1,2")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "each of its 2 jobs" in line and "`python -m bnn_adapt +experiment=cifar80_20_base`" in line
    assert not (tmp_path / "outputs").exists()


def test_missing_base_names_the_exact_command_and_the_missing_data(tmp_path):
    """Issue #14.7: `python -m bnn_adapt +experiment=cifar80_20_udta` on a fresh clone."""
    result = run_here(tmp_path, "bnn_adapt", "+experiment=cifar80_20_udta")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "ste_resnet_cifar_thesis_w1.0_cifar100_20-99.pt does not exist" in line
    assert "pretrain it first with `python -m bnn_adapt +experiment=cifar80_20_base`;" in line
    assert "its data is missing too" in line and str(tmp_path / "data" / "cifar100" / "cifar-100-python") in line
    assert not list((tmp_path / "outputs").glob("bases/*")), "nothing is pretrained"


def test_missing_base_with_data_present_names_a_command_that_writes_it(make_cfg, tmp_path):
    """The command carries what the run changed from the experiment (width, paths), and writes exactly
    the checkpoint the run reads: run as printed, the run then finds its base."""
    cfg = make_cfg("data=cifar5_5", "adapter=head_only", "base.pretrain=null", base_dir=tmp_path / "bases")
    with pytest.raises(CheckpointError) as err:
        task.run(cfg)
    message = str(err.value)
    assert "\n" not in message and "missing too" not in message  # the generated CIFAR-10 is there
    command = message.split("`")[1]
    assert command.startswith("python -m bnn_adapt +experiment=cifar5_5_base ") and "base.width=0.1" in command
    from bnn_adapt.run.config import compose

    made = compose(command.split()[3:])
    assert Path(made.base.save_to) == Path(cfg.base.checkpoint)


# ------------------------------------------------------------------ 3: a typed path is never a new base


def test_a_typed_base_path_that_does_not_exist_is_an_error_not_a_new_base(make_cfg, tmp_path):
    typo = tmp_path / "some" / "typo.ckpt"
    cfg = make_cfg("+experiment=digits5_5", f"base.checkpoint={typo}", base_dir=tmp_path / "bases")
    assert cfg.base.pretrain is not None  # digits would pretrain a missing base at its default place
    with pytest.raises(CheckpointError) as err:
        task.run(cfg)
    message = str(err.value)
    assert "\n" not in message and f"base.checkpoint={typo} does not exist" in message and "check the path" in message
    assert not typo.exists() and not typo.parent.exists()
    assert not (tmp_path / "bases").exists() and not (tmp_path / "run" / "base_pretrain").exists()


def test_a_typed_base_path_on_the_command_line_is_one_line(tmp_path):
    typo = tmp_path / "elsewhere" / "typo.ckpt"  # a path of this test's own: nothing else can create it
    result = run_here(tmp_path, "bnn_adapt", "+experiment=digits5_5", f"base.checkpoint={typo}")
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert f"base.checkpoint={typo} does not exist" in line
    assert not typo.exists() and not typo.parent.exists() and not list((tmp_path / "outputs").glob("bases/*"))


# ------------------------------------------------------------------ 4: the umask's mode


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_mode_of_the_umask(tmp_path, umask):
    from bnn_adapt.adapters import HeadOnly
    from bnn_adapt.adapters.file import export_adapter
    from bnn_adapt.bases import STEResNetCIFAR, save_base
    from bnn_adapt.bases.reactnet import ReActNet18
    from bnn_adapt.bases.reactnet_checkpoint import save_reactnet_checkpoint
    from bnn_adapt.deploy.packed_base import write_packed_base

    base = STEResNetCIFAR(num_classes=5, width=0.1)
    old = os.umask(umask)
    try:
        export_adapter(HeadOnly(base, num_classes=3).eval(), tmp_path / "adapter.safetensors", reference_base=base)
        write_packed_base(base, tmp_path / "base.bnnpack")
        save_base(base, tmp_path / "base.pt")
        save_reactnet_checkpoint(ReActNet18(num_classes=10, width=0.125), str(tmp_path / "model_best.pth.tar"))
        write_json(tmp_path / "metrics.json", {"a": 1})
        with atomic_output(tmp_path / "private.bin") as tmp:  # a writer that makes its file private
            tmp.write_bytes(b"x")
            tmp.chmod(0o600)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and len(modes) == 6, {k: oct(v) for k, v in modes.items()}


# ------------------------------------------------------------------ 5: claims; two invocations of one sweep


def test_a_claim_is_exclusive_names_its_holder_and_is_free_once_the_holder_is_killed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from bnn_adapt.run import claims; held = claims.run_claim({str(run_dir)!r}).acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        claim = claims.run_claim(run_dir)
        assert claim.try_acquire()["pid"] == holder.pid  # another live process holds it, and says who
        assert claims.held_by_another(run_dir)
        holder.kill()  # SIGKILL: no cleanup runs, the OS releases the lock
        holder.wait()
        assert not claims.held_by_another(run_dir)
        assert claim.try_acquire() is None and claim.owner["pid"] == os.getpid()
        assert not claims.held_by_another(run_dir)  # held by this process, not another
        with pytest.raises(RuntimeError, match="already claimed by this process"):
            claims.run_claim(run_dir).try_acquire()
        claim.release()
        assert not claims.held_by_another(run_dir) and claims.run_claim(run_dir).holder() is None
    finally:
        holder.kill()
        holder.wait()


def test_a_row_that_failed_in_the_invocation_holding_it_is_not_run_again(make_cfg, pretrained_base):
    from bnn_adapt.errors import UserError
    from bnn_adapt.run.config import without_hydra_node
    from bnn_adapt.run.results import config_hash

    cfg = make_cfg("data=cifar5_5", "adapter=head_only", "trainer.max_epochs=1")
    run_dir = Path(cfg.paths.output_dir)
    failed = {"status": "failed", "error": "DataError: boom", "config_hash": config_hash(without_hydra_node(cfg))}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time; from bnn_adapt.run import claims; from bnn_adapt.files import write_json\n"
                f"with claims.run_claim({str(run_dir)!r}):\n"
                "    print('held', flush=True); time.sleep(2)\n"
                f"    write_json({str(run_dir / 'metrics.json')!r}, {failed!r})\n"
            ),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="failed in the process that held .*DataError: boom; not running it again"):
            task.run(cfg)
    finally:
        holder.wait(timeout=60)
    assert not (run_dir / "checkpoints").exists() and not claims.held_by_another(run_dir)


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory) -> Path:
    """A tiny digits base at an explicit path, so that the sweeps below only adapt."""
    root = tmp_path_factory.mktemp("digits_base")
    base = root / "base.pt"
    done = run_here(
        root,
        "bnn_adapt",
        "+experiment=digits5_5_base",
        "base.width=0.1",
        f"base.save_to={base}",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return base


@pytest.mark.integration  # two processes at once
def test_the_same_sweep_started_twice_runs_each_row_once(tmp_path, digits_base):
    sweep_dir = tmp_path / "sweep"
    args = [
        sys.executable,
        "-m",
        "bnn_adapt",
        "--multirun",
        "+experiment=digits5_5",
        "base.width=0.1",
        f"base.checkpoint={digits_base}",
        "adapter=head_only,udta",
        "trainer.max_epochs=6",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=${adapter.name}",
    ]
    env = environment(tmp_path)
    procs = [
        subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    stdout = "".join(out for out, _ in outputs)
    assert stdout.count("adapt done") == 2, stdout  # each row trained once, by one of the two
    assert stdout.count("already complete") == 2, stdout  # and found complete by the other
    assert "is held by pid" in stdout  # the second waited for a row the first was running
    rows = sorted(p.parent.name for p in sweep_dir.glob("*/metrics.json"))
    assert rows == ["head_only", "udta"]
    for row in rows:
        assert json.loads((sweep_dir / row / "metrics.json").read_text())["status"] == "complete"
        assert not claims.held_by_another(sweep_dir / row)


# ------------------------------------------------------------------ 2: a killed search leaves no phantom trial


def owned(host: str, pid: int, alive_at: float) -> dict:
    return {
        owners.OWNER_ATTR: {
            "host": host,
            "boot": claims.boot_id(),
            "pid": pid,
            "start": None,
            "since": alive_at,
        },
        owners.ALIVE_ATTR: alive_at,
    }


def test_stale_running_trials_are_failed_and_live_ones_kept(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize", "minimize"])
    here, now = socket.gethostname(), time.time()
    states = {
        "dead pid here": owned(here, dead_pid(), now),
        "this process": owned(here, os.getpid(), now),
        "elsewhere, silent": owned("elsewhere.example", 1, now - owners.STALE_AFTER_S - 10),
        "elsewhere, beating": owned("elsewhere.example", 1, now),
        "no owner (older version)": {},
    }
    trials = {}
    for name, attrs in states.items():
        trial = study.ask()
        for key, value in attrs.items():
            trial.storage.set_trial_system_attr(trial._trial_id, key, value)  # optuna 5: no Trial.set_system_attr
        trials[name] = trial.number
    done = study.ask()
    study.tell(done, [0.5, 3.0])
    with sqlite3.connect(tmp_path / "optuna.db") as db:  # the legacy trial started long ago
        db.execute(
            "UPDATE trials SET datetime_start = '2000-01-01 00:00:00' WHERE number = ?",
            (trials["no owner (older version)"],),
        )

    failed = owners.fail_stale_trials(url, "s")
    after = {t.number: t.state for t in optuna.load_study(study_name="s", storage=url).trials}
    gone = ("dead pid here", "elsewhere, silent", "no owner (older version)")
    assert {name for name, n in trials.items() if after[n] == optuna.trial.TrialState.FAIL} == set(gone)
    assert {name for name, n in trials.items() if after[n] == optuna.trial.TrialState.RUNNING} == {
        "this process",
        "elsewhere, beating",
    }
    assert len(failed) == 3 and all(line.startswith("trial ") for line in failed)
    assert owners.trial_counts(url, "s") == {"FAIL": 3, "RUNNING": 2, "COMPLETE": 1}


@pytest.mark.integration  # a process killed mid-trial
def test_a_search_killed_mid_trial_continues_without_a_phantom_trial(tmp_path):
    search = (
        "+experiment=digits5_5",
        "+profile=smoke",
        "hparams_search=size_vs_accuracy",
        "base.pretrain.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    )
    sweep_dir = tmp_path / "outputs" / "pareto" / "smoke" / "digits_ste_resnet_cifar_w0.25"
    url = f"sqlite:///{sweep_dir / 'optuna.db'}"
    env = environment(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnn_adapt", *search, "trainer.max_epochs=1000", "hydra.sweeper.n_trials=1"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(sweep_dir.glob("*/csv/metrics.csv")):  # the trial is training
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the search ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    running = optuna.trial.TrialState.RUNNING
    assert [t.state for t in optuna.load_study(study_name="size_vs_accuracy", storage=url).trials] == [running]

    again = run_here(tmp_path, "bnn_adapt", *search, "trainer.max_epochs=1", "hydra.sweeper.n_trials=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "note: marked failed, trial 0: its search (pid" in again.stderr
    trials = optuna.load_study(study_name="size_vs_accuracy", storage=url).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "is gone" in trials[0].system_attrs[owners.WHY_ATTR]
    assert len((sweep_dir / "trials.csv").read_text().splitlines()) == 1 + 1  # header + the finished trial


# ------------------------------------------------------------------ 6: run directories on the command line


def test_export_takes_a_sweep_directory_and_row_directories_unquoted(pretrained_base, make_cfg, tmp_path):
    sweep = tmp_path / "sweep"
    for row in ("row=head_only", "row=udta,seed=2"):
        extra = ["seed=2"] if "seed" in row else []
        cfg = make_cfg(
            "data=cifar5_5",
            f"adapter={row.split(',')[0].removeprefix('row=')}",
            "trainer.max_epochs=1",
            *extra,
            name=f"sweep/{row}",
        )
        assert task.run(cfg)["status"] == "complete"
    write_json(sweep / "row=broken" / "metrics.json", {"status": "failed", "task": "adapt", "error": "x"})

    whole = run_here(
        tmp_path, "bnn_adapt", "task=export", f"export.adapter_run={sweep}", f"export.dir={tmp_path / 'all'}"
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "not row=broken" in whole.stderr
    manifest = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert sorted(Path(f["run_dir"]).name for f in manifest["files"].values() if f["kind"] == "adapter") == [
        "row=head_only",
        "row=udta,seed=2",
    ]

    rows = f"export.adapter_run=[{sweep / 'row=head_only'},{sweep / 'row=udta,seed=2'}]"  # as typed, no quotes
    listed = run_here(tmp_path, "bnn_adapt", "task=export", rows, f"export.dir={tmp_path / 'listed'}")
    assert listed.returncode == 0, listed.stderr[-3000:]
    manifest = json.loads((tmp_path / "listed" / "manifest.json").read_text())
    assert len([f for f in manifest["files"].values() if f["kind"] == "adapter"]) == 2

    with pytest.raises(ExportError, match=r"row=broken did not finish \(status failed: x\)"):
        task.run(
            make_cfg(
                "task=export",
                f"export.adapter_run={sweep / 'row=broken'}",
                f"export.dir={tmp_path / 'no'}",
                name="export_failed",
            )
        )
    write_json(tmp_path / "failed_sweep" / "row=broken" / "metrics.json", {"status": "failed", "task": "adapt"})
    with pytest.raises(ExportError, match="nor run directories of finished adaptation runs"):
        task.run(
            make_cfg(
                "task=export",
                f"export.adapter_run={tmp_path / 'failed_sweep'}",
                f"export.dir={tmp_path / 'no'}",
                name="export_none",
            )
        )
    assert not (tmp_path / "no").exists()


def test_only_unparseable_path_values_are_quoted(tmp_path):
    (tmp_path / "row=a").mkdir()
    assert quote_path_overrides(["adapter.groups=3", "export.adapter_run=out/t", "seed=1"]) == [
        "adapter.groups=3",
        "export.adapter_run=out/t",
        "seed=1",
    ]
    assert quote_path_overrides([f"export.adapter_run=[{tmp_path}/row=a,{tmp_path}/row=b,seed=2]"]) == [
        f"export.adapter_run=['{tmp_path}/row=a','{tmp_path}/row=b,seed=2']"
    ]
    assert quote_path_overrides(["base.checkpoint=x/row=a/base.pt"]) == ["base.checkpoint='x/row=a/base.pt'"]


# ------------------------------------------------------------------ 8: a failed download


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        ("fashion_mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
        ("flowers102", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    ],
)
def test_a_failed_download_says_so_with_url_and_folder(name, url, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr("bnn_adapt.training.datasets.fashion_mnist.SYSTEM_DIRS", ())
    root = tmp_path / "data" / name
    dm = ClassSplitDataModule(name, root=str(root), base_classes=[0, 1], target_classes=[2, 3], download=True)
    with pytest.raises(DataError) as err:
        dm.setup()
    message = str(err.value)
    assert f"downloading {dm.spec.title.split(' ')[0]}" in message and f"from {url} failed" in message
    assert "(no network: [Errno 101] Network is unreachable)" in message and str(root) in message
    assert "set data.download=true" not in message and "\n" not in message
    assert not root.exists(), "a failed download leaves nothing behind"
