"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """Bad input from the user (config, data, layer names, checkpoints).

    The CLI prints ``error: <message>`` on one line and exits with status 2,
    without a traceback.
    """


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for the closest choices, or ''."""
    close = difflib.get_close_matches(name[:200], list(choices), n=n, cutoff=0.5)  # a 10 MB typo costs nothing
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _short_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    # Few items per level and few levels: a YAML alias bomb (nested lists sharing their items) is rendered
    # by visiting at most a few hundred objects, never by expanding it.
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = 60, 60, 40
    return r


_REPR = _short_repr()


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without rendering more of it than that.

    Every user value an error message shows goes through this: a 10 MB name or a YAML alias bomb
    must not turn one error line into gigabytes.
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 300) -> str:
    """``text`` (a path, a name) cut to ``limit`` characters, for an error line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
