"""What users of 0.1 already have keeps working in 0.2.0 (CHANGELOG.md): renamed config keys on the
command line (with a one-line note; in a config file, one line naming the new key), the old module names.
"""

from __future__ import annotations

import warnings

import pytest
from omegaconf import open_dict

from bnn_adapt.errors import ConfigError
from bnn_adapt.run import task
from bnn_adapt.run.config import rename_deprecated_overrides
from tests.test_reliability import cli


def test_renamed_keys_on_the_command_line_are_rewritten_with_a_note(capsys):
    old = ["trainer.memory=lean", "+adapter.cache_taps=true", "data.cached_views=2", "adapter.cache_max_gb=3",
           "reduction=groups", "reduction.groups=5", "seed=1", "--multirun"]  # fmt: skip
    assert rename_deprecated_overrides(old) == [
        "memory=lean", "tap_cache.enabled=true", "tap_cache.views=2", "tap_cache.max_gb=3", "adapter.groups=5",
        "seed=1", "--multirun",
    ]  # fmt: skip
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 6 and all(n.startswith("note: ") and "deprecated" in n for n in notes)
    # reduction=groups alone meant 10 groups
    assert rename_deprecated_overrides(["reduction=groups"]) == ["adapter.groups=10"]


def test_renamed_keys_work_from_the_command_line(tmp_path):
    done = cli(tmp_path, "summary_only=true", "base.width=0.1", "+experiment=digits5_5_serial", "reduction=groups",
               "reduction.groups=2", "trainer.memory=lean")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: reduction.groups is deprecated, use adapter.groups" in done.stderr
    assert "note: trainer.memory is deprecated, use memory" in done.stderr


def test_renamed_keys_in_a_config_file_stop_the_run_naming_the_new_key(make_cfg):
    """0.2.0 translates renamed keys on the command line only: a config file that still sets one (an
    experiment file written for 0.1) stops before any work with one line naming the new key."""
    cfg = make_cfg("data=cifar5_5", "adapter=udta")
    with open_dict(cfg):  # as an experiment file written for 0.1 would set them
        cfg.trainer.memory = "lean"
    with pytest.raises(ConfigError, match=r"^trainer.memory was renamed to memory in bnn_adapt 0.2.0: set memory"):
        task.run(cfg)
    with open_dict(cfg):
        del cfg.trainer.memory
        cfg.adapter.cache_taps = True  # a key nothing reads: without the check it would be ignored silently
    with pytest.raises(ConfigError, match=r"adapter.cache_taps was renamed to tap_cache.enabled"):
        task.run(cfg)


def test_old_module_names_still_import_and_run():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from bnn_adapt.strategies import Parallel as Old  # noqa: PLC0415
    from bnn_adapt.adapters import Parallel  # noqa: PLC0415

    assert Old is Parallel  # the same class, not a copy
    assert any("bnn_adapt.strategies moved to bnn_adapt.adapters" in str(w.message) for w in caught)


def test_old_module_names_run_with_python_m(tmp_path):
    from tests.test_tables import run_module  # noqa: PLC0415

    result = run_module(tmp_path, "bnn_adapt.tables", "--list")
    assert result.returncode == 0, result.stderr
    assert "6.5" in result.stdout and "moved to bnn_adapt.tools.tables" in result.stderr
