"""The documentation site: the configuration reference is what conf/ says today (regenerated and compared),
it lists every group and choice, the site builds strictly (no broken link or anchor, no page left out of
the navigation, no missing included file), and the README's links into it resolve."""

from __future__ import annotations

import re

import markdown

from bnn_adapt.run.config import CONF_DIR, REPO_ROOT
from docs.hooks import config_reference


def test_configuration_reference_is_what_conf_says_today():
    assert config_reference.PAGE.read_text() == config_reference.render(), (
        f"{config_reference.PAGE} is stale: run {config_reference.COMMAND} and commit the page"
    )


def test_configuration_reference_lists_every_group_and_choice():
    page = config_reference.PAGE.read_text()
    files = sorted(CONF_DIR.rglob("*.yaml"))
    groups = {p.parent.relative_to(CONF_DIR).as_posix() for p in files if p.parent != CONF_DIR}
    assert {"adapter", "base", "data", "experiment", "hydra/launcher", "trainer"} <= groups
    for group in groups:
        assert f"\n## {group} {{#" in page, group
    for path in files:
        assert f"`conf/{path.relative_to(CONF_DIR).as_posix()}`" in page, path


def test_the_site_builds_strictly(tmp_path, monkeypatch):
    """``make docs``: MkDocs in strict mode (a warning aborts the build), from the repository root."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.chdir(REPO_ROOT)  # the snippets (CHANGELOG.md, benchmarks/*.md) are found from there
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    build(load_config(config_file=str(REPO_ROOT / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site")))
    config_page = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    assert "adapter.groups" in config_page
    speed = (tmp_path / "site" / "speed" / "index.html").read_text()
    assert "speed-up vs finetune" in speed  # benchmarks/results.md, included as make bench wrote it


def test_the_readme_links_to_files_and_headings_that_exist():
    readme = (REPO_ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if "://" in link:
            continue
        path, _, anchor = link.partition("#")
        target = REPO_ROOT / path
        assert target.is_file(), f"README links to {path}, which does not exist"
        if anchor:
            html = markdown.markdown(target.read_text(), extensions=["toc", "tables"])
            assert f'id="{anchor}"' in html, f"README links to {link}: {path} has no heading #{anchor}"
