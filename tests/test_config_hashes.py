"""Config hashes decide whether a finished run counts as complete: they must not move when
code is only reorganised. ``tests/data/config_hashes.json`` holds hashes recorded before the
0.2 restructuring; an intended change of what a config computes updates that file, in the
same commit, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnn_adapt.run.config import CONF_DIR, SWEEPS_DIR, compose, without_hydra_node
from bnn_adapt.run.results import config_hash

CASES = json.loads((Path(__file__).parent / "data" / "config_hashes.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['config_name']}:{' '.join(c['overrides'])}" for c in CASES])
def test_config_hash_of_runs_written_before_is_kept(case):
    config_dir = SWEEPS_DIR if case["config_dir"] == "sweeps" else CONF_DIR
    cfg = compose(case["overrides"], case["config_name"], config_dir)
    assert config_hash(without_hydra_node(cfg)) == case["config_hash"]
