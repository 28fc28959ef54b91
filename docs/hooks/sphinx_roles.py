"""A Griffe extension for the API pages: the docstrings cross-reference in Sphinx's roles
(``:class:`X```, ``:func:`~a.b```), which Markdown would print as they are; each becomes ``X`` or ``b``
in code type, as Sphinx would show it (mkdocstrings loads it: ``extensions`` in mkdocs.yml; the Griffe extension API:
https://mkdocstrings.github.io/griffe/guide/users/extending/)."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    """Sphinx's spelling: ``~a.b`` shows ``b``, anything else as written (a leading dot dropped)."""
    target = match[2].lstrip(".")
    return f"`{target.rsplit('.', 1)[-1] if match[1] else target}`"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
