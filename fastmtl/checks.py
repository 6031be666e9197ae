"""Argument checks used at the public boundaries: one function per concept.

Each raises ``ValueError`` naming the argument as the caller knows it (a field, a keyword
or a CLI flag), so every bad input reads the same way wherever it enters.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["integer", "number", "one_of", "writable_file", "writable_dir"]


def integer(name: str, value: Any, minimum: int = 1, optional: bool = False) -> Any:
    """``value`` if it is an integer >= ``minimum`` (or None when ``optional``).

    Example:
        >>> integer("n_way", 5, minimum=2)
        5
    """
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, "
                         f"got {value!r}")
    return value


def number(name: str, value: Any, low: float = 0.0, inclusive: bool = False,
           optional: bool = False) -> Any:
    """``value`` if it is a finite real number > ``low`` (>= with ``inclusive``).

    Example:
        >>> number("lr", 1e-3)
        0.001
    """
    if value is None and optional:
        return value
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = real and math.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low:g}"
                         f"{' or None' if optional else ''}, got {value!r}")
    return value


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``; else a ValueError naming ``name``.

    Example:
        >>> one_of("head", "cosine", ("linear", "cosine"))
        'cosine'
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def describe(value: Any) -> str:
    """What an argument is, for an error message: its shape if it has one (tensors,
    arrays), else its type.

    Example:
        >>> describe([1, 2]), describe(math)
        ('list', 'module')
    """
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(value).__name__


def per_channel(name: str, values: Any, default: float, channels: int,
                positive: bool = False) -> tuple[float, ...]:
    """A per-channel ``mean`` or ``std``: one finite number a channel (> 0 with
    ``positive``); None gives ``default`` for each.

    Example:
        >>> per_channel("std", [0.5], 1.0, 1, positive=True)
        (0.5,)
    """
    if values is None:
        return (float(default),) * channels
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of {channels} number(s), got "
                         f"{values!r}") from None
    if len(out) != channels or not all(math.isfinite(v) and (v > 0 or not positive)
                                       for v in out):
        raise ValueError(f"{name} must hold {channels} finite number(s){' > 0' if positive else ''}"
                         f", one a channel, got {out}")
    return out


def writable_dir(name: str, path: str) -> str:
    """Create ``path`` as a directory if needed; ValueError unless it is a writable one.

    Example:
        >>> import tempfile, os
        >>> d = writable_dir("--out", os.path.join(tempfile.mkdtemp(), "runs"))
        >>> os.path.isdir(d)
        True
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{name} {path!r} cannot be created: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"{name} {path!r} is not writable")
    return path


def writable_file(name: str, path: str) -> str:
    """ValueError unless ``path`` can be written as a file (not a directory, device, pipe
    or socket; its folder exists or can be created, and is writable); returns ``path``.

    Example:
        >>> import tempfile
        >>> writable_file("--out", tempfile.gettempdir())
        Traceback (most recent call last):
        ...
        ValueError: --out '...' is a directory; give a file path
    """
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a directory; give a file path")
    if os.path.exists(path) and not os.path.isfile(path):
        # Results are written beside the path and renamed over it, which would replace
        # a device such as /dev/null for every program on the machine.
        raise ValueError(f"{name} {path!r} is not a regular file (a device, pipe or "
                         f"socket); give a file path, or drop {name}")
    folder = os.path.dirname(os.path.abspath(path))
    writable_dir(f"{name}'s folder", folder)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{name} {path!r} is not writable")
    return path
