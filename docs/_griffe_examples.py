"""A griffe extension for fastmtl's docstrings: their ``Example:`` section is an examples
section (griffe's Google parser knows only ``Examples:``), so its doctests render as code."""
from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
