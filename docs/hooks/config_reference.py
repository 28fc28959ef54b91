"""The configuration reference page, generated from ``conf/``: every group, choice and key with its default
and the comment beside it in the YAML.

An MkDocs hook (``hooks:`` in mkdocs.yml): every ``make docs`` rewrites ``docs/reference/configuration.md``
when it differs from what ``conf/`` says, before the site is built; ``tests/test_docs.py`` regenerates it and fails when the committed page differs, so the page cannot
drift from the files. Values come from PyYAML, as Hydra reads them. Comments are not part of YAML's
data model (PyYAML drops them), so :func:`comments` pairs each with its key by indentation: a comment
at the end of a key's line, or the comment lines right above it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from bnn_adapt.files import atomic_output
from bnn_adapt.run.config import CONF_DIR, REPO_ROOT

PAGE = REPO_ROOT / "docs" / "reference" / "configuration.md"
COMMAND = "make docs"
KEY = re.compile(r"^(?P<indent>\s*)(?P<item>- )?(?P<key>[^\s#:'\"\[{][^:#]*?):(?=\s|$)(?P<rest>.*)$")
#: groups chosen with ``+group=NAME`` (no default in conf/config.yaml)
ADDED_GROUPS = ("experiment", "profile")


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes or not after a space is part of the value."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def comments(text: str) -> tuple[str, dict[str, str]]:
    """A YAML file's leading comment and, per dotted key (``defaults`` entries as ``defaults/ENTRY``), its comment."""
    header: list[str] = []
    found: dict[str, str] = {}
    pending: list[str] = []
    stack: list[tuple[int, str]] = []
    started = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            note = stripped.lstrip("#").strip()
            if note.startswith("@package"):
                continue
            (pending if started else header).append(note)
            continue
        if not stripped:
            pending = []
            continue
        started = True
        match = KEY.match(line)
        in_defaults = stack[:1] == [(0, "defaults")] and stripped.startswith("- ")
        if in_defaults:
            entry, note = _split_comment(stripped[2:])
            key = f"defaults/{entry}"
        elif match and not match["item"]:
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match["key"].strip()))
            key = ".".join(k for _, k in stack)
            note = _split_comment(match["rest"])[1]
        else:
            pending = []
            continue
        note = " ".join([*pending, note]).strip()
        if note:
            found[key] = note
        pending = []
    return " ".join(header), found


def _package(path: Path, text: str) -> str:
    """Where a group file's keys land: ``# @package _global_`` at the root, else at the group's path."""
    if re.search(r"^#\s*@package\s+_global_", text, re.M):
        return ""
    return ".".join(path.parent.relative_to(CONF_DIR).parts)


NODE = object()  # a mapping's own row: listed only when a comment describes it


def _flatten(node, prefix: str) -> list[tuple[str, object]]:
    if isinstance(node, dict) and node:
        rows = [(prefix, NODE)] if prefix else []
        for key, value in node.items():
            rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    return [(prefix, node)]


def _value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _text(note: str) -> str:
    """A comment as Markdown table-cell text: its own `code` kept, everything else taken literally."""
    parts = note.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = re.sub(r"([\\*_\[\]<>|])", r"\\\1", parts[i])
    return "`".join(parts)


def _code(text: str) -> str:
    """Code in a table cell: Python-Markdown's tables split no cell inside a code span, so nothing is escaped."""
    return f"`{text}`" if text else ""


def choice_section(path: Path, heading: str) -> list[str]:
    """One file of a group (or the root config): what it is, then its defaults and its keys, one row each."""
    text = path.read_text()
    header, notes = comments(text)
    data = yaml.safe_load(text) or {}
    package = _package(path, text)
    lines = [heading, "", f"`conf/{path.relative_to(CONF_DIR)}`" + (f": {_text(header)}" if header else ""), ""]
    defaults = data.pop("defaults", None) or []
    if defaults:
        lines += ["| defaults entry | comment |", "|---|---|"]
        for entry in defaults:
            spelled = entry if isinstance(entry, str) else ", ".join(f"{k}: {_value(v)}" for k, v in entry.items())
            lines.append(f"| {_code(spelled)} | {_text(notes.get(f'defaults/{spelled}', ''))} |")
        lines.append("")
    rows = [(key, value) for key, value in _flatten(data, "") if value is not NODE or key in notes]
    if rows and rows != [("", {})]:
        lines += ["| key | default | comment |", "|---|---|---|"]
        for key, value in rows:
            shown = "" if value is NODE else _code(_value(value))
            lines.append(f"| {_code(f'{package}.{key}' if package else key)} | {shown} | {_text(notes.get(key, ''))} |")
        lines.append("")
    elif not defaults:
        lines += ["(no keys)", ""]
    return lines


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
        "differs from what the command writes. Every config group, each of its choices and every key, with its "
        "default and the comment beside it in the YAML. Choose a group's option with `group=choice` (a group "
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
            default = _code(_value(chosen[group]))
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
