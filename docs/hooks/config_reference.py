"""The configuration reference page, generated from ``conf/``: every group and each of its choices, as the
YAML file says it (defaults and comments).

An MkDocs hook (``hooks:`` in mkdocs.yml): every ``make docs`` rewrites ``docs/reference/configuration.md``
when it differs from what ``conf/`` says, before the site is built; ``tests/test_docs.py`` regenerates it
and fails when the committed page differs, so the page cannot drift from the files.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from bnn_adapt.files import atomic_output
from bnn_adapt.run.config import CONF_DIR, REPO_ROOT

PAGE = REPO_ROOT / "docs" / "reference" / "configuration.md"
COMMAND = "make docs"
#: groups chosen with ``+group=NAME`` (no default in conf/config.yaml)
ADDED_GROUPS = ("experiment", "profile")


def _package(path: Path, text: str) -> str:
    """Where a group file's keys land: ``# @package _global_`` at the root, else at the group's path."""
    if re.search(r"^#\s*@package\s+_global_", text, re.M):
        return ""
    return ".".join(path.parent.relative_to(CONF_DIR).parts)


def choice_section(path: Path, heading: str) -> list[str]:
    """One file of a group (or the root config) as it is, its comments included, and where its keys land."""
    text = path.read_text()
    package = _package(path, text) if path.parent != CONF_DIR else ""
    where = f": its keys are under `{package}.`" if package else ""
    return [heading, "", f"`conf/{path.relative_to(CONF_DIR)}`{where}", "", "```yaml", text.rstrip(), "```", ""]


def groups() -> dict[str, list[Path]]:
    """Every config group under conf/ (nested ones as ``hydra/launcher``) -> its choices' files."""
    found: dict[str, list[Path]] = {}
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        if path.parent != CONF_DIR:
            found.setdefault(path.parent.relative_to(CONF_DIR).as_posix(), []).append(path)
    return found


def root_defaults() -> dict[str, str]:
    entries = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()}


def render() -> str:
    """The whole page."""
    chosen = root_defaults()
    found = groups()
    lines = [
        "# Configuration reference",
        "",
        f"Generated from `conf/` by `{COMMAND}`; do not edit by hand: `tests/test_docs.py` fails when this page "
        "differs from what the command writes. Every config group and each of its choices, as its YAML file says "
        "it, comments included. Choose a group's option with `group=choice` (a group "
        "without a default: `+group=choice`), set a key with `key=value`, e.g. "
        "`python -m bnn_adapt +experiment=cifar80_20_udta adapter.groups=channels trainer.max_epochs=5`. "
        "Values written `${...}` are interpolations, resolved when the run starts. Table sweeps live in "
        "`sweeps/` ([reproducing the thesis](../thesis.md)).",
        "",
        "## Groups",
        "",
        "| group | default | choices |",
        "|---|---|---|",
    ]
    for group, paths in found.items():
        if group in chosen:
            default = "`null`" if chosen[group] is None else f"`{chosen[group]}`"
        elif group in ADDED_GROUPS:
            default = f"none: `+{group}=NAME`"
        else:
            default = "Hydra's own"
        links = ", ".join(f"[{p.stem}](#{_anchor(group, p.stem)})" for p in paths if not p.stem.startswith("_"))
        lines.append(f"| [{group}](#{_anchor(group)}) | {default} | {links} |")
    lines += ["", *choice_section(CONF_DIR / "config.yaml", "## The root config"), ""]
    for group, paths in found.items():
        lines += [f"## {group} {{#{_anchor(group)}}}", ""]
        for path in paths:
            name = path.stem
            plus = "+" if group in ADDED_GROUPS else ""
            title = (
                f"### `{group}/{name}`: shared by every choice (`defaults: [{name}]`)"
                if name.startswith("_")
                else f"### {plus}{group}={name}"
            )
            lines += choice_section(path, f"{title} {{#{_anchor(group, name)}}}")
    return "\n".join(lines).rstrip() + "\n"


def _anchor(group: str, name: str | None = None) -> str:
    slug = group.replace("/", "-") + (f"-{name.strip('_')}" if name else "")
    return slug.replace("_", "-")


def on_pre_build(config) -> None:
    """MkDocs hook: write the page before the build when ``conf/`` changed it."""
    text = render()
    if not PAGE.is_file() or PAGE.read_text() != text:
        with atomic_output(PAGE) as tmp:
            tmp.write_text(text)
