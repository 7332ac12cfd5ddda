"""Format names: CLI strings and manifest dicts resolved against an allowlist (never by import or eval).

Each format family contributes one parser keyed by the family prefix of its spec string (``int4:g64`` -> ``int``)
and its spec class (for ``to_dict``/``from_dict``). Combinations (``sparse:2:4+int4:g64``) are parsed by the family
that owns the combination.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from ..errors import FormatError
from .base import Format
from .intgroup import IntGroup, parse_intgroup
from .sum import Sum

Parser = Callable[[str], Format]

# family prefix -> parser; family name -> spec class. Extended by format modules through `register_format`.
_PARSERS: dict[str, Parser] = {"int": parse_intgroup}
_CLASSES: dict[str, type[Format]] = {"int": IntGroup, "sum": Sum}


# families whose parser owns a "+" (e.g. "sparse:2:4+int4:g64" is one sparse format with an inner format)
_COMBINED: set[str] = set()


def register_format(prefix: str, cls: type[Format], parser: Parser, *, owns_plus: bool = False) -> None:
    """Make a format family known to the CLI and the checkpoint loader (call once, at import of its module).

    ``owns_plus``: the family's own parser handles ``+`` in its specs instead of the generic ``Sum``.
    """
    _PARSERS[prefix] = parser
    _CLASSES[cls.family] = cls
    if owns_plus:
        _COMBINED.add(prefix)


def known_formats() -> list[str]:
    return sorted(_PARSERS)


def parse_format(spec: str) -> Format:
    """``"int4:g64"`` -> ``IntGroup(bits=4, group_size=64)``; a FormatError lists the known families."""
    if not isinstance(spec, str) or not spec.strip():
        raise FormatError(f"a format spec must be a non-empty string, got {spec!r}")
    s = spec.strip().lower()
    m = re.match(r"^[a-z]+", s)
    head = m.group(0) if m else ""
    if "+" in s and head not in _COMBINED:  # a generic sum of two parts: "int4:g64+lowrank:r32"
        base, extra = s.split("+", 1)
        return Sum(base=parse_format(base), extra=parse_format(extra))
    # the family is the spec's leading letters: "int" in "int4:g64", "nvfp" in "nvfp4", "sparse" in "sparse:2:4"
    if head in _PARSERS:
        return _PARSERS[head](s)
    raise FormatError(f"unknown format {spec!r}; known format families: {', '.join(known_formats())}")


def format_from_dict(d: dict[str, Any]) -> Format:
    """Rebuild a spec from ``Format.to_dict()``; only registered families and declared fields are accepted."""
    if not isinstance(d, dict) or "family" not in d:
        raise FormatError(f"a format dict needs a 'family' key, got {d!r}")
    cls = _CLASSES.get(d["family"])
    if cls is None:
        raise FormatError(f"unknown format family {d['family']!r}; known: {', '.join(sorted(_CLASSES))}")
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(d) - names - {"family"}
    if extra:
        raise FormatError(f"format {d['family']!r}: unknown fields {sorted(extra)}")
    kwargs = {k: (format_from_dict(v) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v)
              for k, v in d.items() if k != "family"}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise FormatError(f"format {d['family']!r}: {e}") from e
