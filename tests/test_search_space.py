"""The size-vs-accuracy search proposes only what the configured base can run: its group counts follow the
base's channels, a value the base cannot run stops the search before its first trial in one line, and every
trial the sweeper and the search's hook propose builds."""

from __future__ import annotations

import optuna
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import open_dict, read_write

from bnn_adapt.adapters import STRATEGIES
from bnn_adapt.bases import BASES
from bnn_adapt.run.config import compose
from bnn_adapt.search.pareto import ParetoFrontReport, search_space
from bnn_adapt.search.space import group_choices
from tests.helpers.cli import SEARCH

REACTNET = ("base=reactnet18", "base.width=0.125", "data.image_size=64")  # tiny input, stages of 8/16/32/64


def search_config(tmp_path, *overrides: str, edit=None):
    """The search's config as a worker composes it; ``edit(cfg)``: changes made before Hydra holds it."""
    cfg = compose([*SEARCH, f"paths.root_dir={tmp_path}", *overrides], return_hydra_config=True)
    if edit is not None:
        with read_write(cfg), open_dict(cfg):
            edit(cfg)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.mark.parametrize(
    ("overrides", "choices"),
    [
        (("base.width=1.0",), [1, 2, 5, 10, 20, "channels"]),  # the thesis's own values at 80/160/320
        (("base.width=0.25",), [1, 2, 5, 10, 20, "channels"]),  # 20/40/80: all of them divide
        (("base.width=0.1",), [1, 2, 4, 8, "channels"]),  # 8/16/32: 5, 10, 20 divide none
        (REACTNET, [1, 2, 4, 8, "channels"]),
        (("base=reactnet18", "base.width=1.0"), [1, 2, 4, 8, "channels"]),  # 64/128/256/512
    ],
)
def test_the_groups_searched_follow_the_base(overrides, choices, tmp_path):
    assert group_choices(search_config(tmp_path, *overrides)) == choices


def proposals(cfg, n: int) -> list[dict]:
    """``n`` trials as the Optuna sweeper makes them: its parameters (``hydra.sweeper.params``) suggested
    first, then the search's hook (``custom_search_space``), in a study of their own."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    distributions, fixed, _ = create_params_from_overrides(params)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        for name, distribution in distributions.items():
            trial._suggest(name, distribution)
        search_space(cfg, trial)
        out.append({**trial.params, **fixed})
        study.tell(trial, [0.5, 1.0])
    return out


@pytest.mark.parametrize("overrides", [("base.width=0.1",), REACTNET], ids=["ste_w0.1", "reactnet18"])
def test_every_trial_the_search_proposes_can_be_built(overrides, tmp_path):
    """Built on the meta device as the trial's job would build it (its strategy, groups, stages, bits)."""
    cfg = search_config(tmp_path, *overrides)
    arguments = {"width": cfg.base.width, **({"num_classes": 10} if cfg.base.name == "ste_resnet_cifar" else {})}
    trials = proposals(cfg, 40)
    assert {t["adapter"] for t in trials} == {"serial", "udta"} and "adapter.groups" in trials[0]
    for t in trials:
        options = {"groups": t["adapter.groups"], "bits": int(t["adapter.bits"])}
        if t["adapter"] == "serial":
            options["stages"] = [int(s) for s in t["adapter.stages"].strip("[]").split(",")]
        with torch.device("meta"):
            STRATEGIES[t["adapter"]](BASES[cfg.base.name](**arguments), 5, **options)  # raises if it cannot run


@pytest.mark.parametrize(
    "override",
    ["search.groups=[1,5,10]", "custom space", "command line"],
)
def test_a_group_count_the_base_cannot_run_is_one_line_before_the_first_trial(override, tmp_path, capsys):
    def edit(cfg):
        if override == "custom space":  # an hparams_search file of one's own, as conf/hparams_search/ holds
            cfg.hydra.sweeper.params["adapter.groups"] = "choice(1, 5)"
        elif override == "command line":  # a sweep override: Hydra hands it to the sweeper
            cfg.hydra.overrides.task.append("adapter.groups=choice(1,5)")

    cfg = search_config(tmp_path, "base.width=0.1", *([override] if override.startswith("search") else []), edit=edit)
    with pytest.raises(SystemExit) as stopped:
        ParetoFrontReport().on_multirun_start(cfg)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "offers 5" in lines[0] and "it can run 1, 2, 4, 8, channels" in lines[0], lines
    assert not (tmp_path / "outputs" / "pareto").exists()  # stopped before the sweep directory was made


def test_the_groups_given_are_searched_as_given(tmp_path):
    cfg = search_config(tmp_path, "base.width=0.1", "search.groups=[2,channels]")
    ParetoFrontReport().on_multirun_start(cfg)
    assert {t["adapter.groups"] for t in proposals(cfg, 12)} == {2, "channels"}
