"""raycv: Ray-orchestrated cross-validation and hyperparameter search for BERT-family regressors.

Data flow, one module each:
config -> data (folds, tokens) / model -> train_fold (plain PyTorch) -> worker (Ray Train) -> sweep (Ray
Tune) -> collect (out-of-fold predictions) -> report; below them all, storage (the run's files) and scoring
(RMSEs), and progress (the two progress lines).
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from typing import TypeVar

__version__ = "0.1.0"

T = TypeVar("T")


class RaycvError(Exception):
    """A problem with the user's input. The CLI prints it as one line and exits with status 2."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first non-empty line, for a one-line error; its type's name where
    the message is empty (an empty file makes torch and others raise with no text)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


_SHOWN = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 3, 80, 80, 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
SHOWN_MAX = 200


def shown(value: object) -> str:
    """A user's value, as an error line quotes it: its repr, cut short. A YAML alias bomb (each list nine
    aliases of the one before) printed a 226 MB line; a 1 MB cell or config value would print all of it."""
    text = _SHOWN.repr(value)
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX - 3] + "..."


def attempt(problems: list[str], step: Callable[[], T]) -> T | None:
    """step(), or None with its problems added to `problems` (one line each, naming their file): a command
    checks all its inputs before it refuses them, so every problem is reported at once."""
    try:
        return step()
    except RaycvError as exc:  # a ConfigError or DataError holds several problems
        problems += exc.lines() if hasattr(exc, "lines") else [str(exc)]
    return None
