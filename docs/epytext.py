"""
A Sphinx extension that turns the epytext of txfractal's docstrings into
reStructuredText for autodoc: C{@param x:} fields become C{:param x:} fields,
and C{L{...}}, C{C{...}}, C{I{...}} and C{B{...}} become literals, emphasis
and strong emphasis.
"""

from __future__ import annotations

import re
from typing import Any

_FIELD = re.compile(
    r"^(\s*)@(param|type|return|returns|rtype|raise|raises|ivar|cvar|var|since|note|see)"
    r"(\s+[^:]+)?:"
)
_MARKUP = re.compile(r"([LCIBU])\{([^{}]*)\}")
_FIELD_NAMES = {"raise": "raises", "returns": "return", "see": "seealso"}


def _inline(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        kind, body = match.groups()
        if not body:
            return ""
        if kind in "LCU":
            marked = f"``{body}``"
        elif kind == "I":
            marked = f"*{body}*"
        else:
            marked = f"**{body}**"
        # reST inline markup must not touch a letter: "L{Item}s" is
        # written "``Item``\\ s".
        source, before, after = match.string, match.start(), match.end()
        if before > 0 and source[before - 1].isalnum():
            marked = "\\ " + marked
        if after < len(source) and source[after].isalnum():
            marked += "\\ "
        return marked

    previous = None
    while previous != text:
        previous, text = text, _MARKUP.sub(replace, text)
    return text


def _convert(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    converted = []
    inField = False
    for line in lines:
        match = _FIELD.match(line)
        if match:
            indent, field, argument = match.groups()
            field = _FIELD_NAMES.get(field, field)
            argument = (argument or "").strip()
            rest = line[match.end() :]
            if field in ("since", "note", "seealso"):
                label = {"since": "Since", "note": "Note", "seealso": "See"}[field]
                line = f"{indent}:{label}:{rest}"
            else:
                line = f"{indent}:{field}{' ' + argument if argument else ''}:{rest}"
            if converted and converted[-1].strip() and not inField:
                converted.append("")
            inField = True
        elif not line.strip():
            inField = False
        converted.append(_inline(line))
    lines[:] = converted


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _convert)
    return {"parallel_read_safe": True}
