"""Small shared checks for user-given settings, so every message reads the same way.

Examples:
    >>> positive_int("max_tokens", 0)
    Traceback (most recent call last):
    ...
    ValueError: max_tokens is 0; expected a positive int
"""

from __future__ import annotations

from typing import Any


def positive_int(name: str, value: Any, *, optional: bool = False, meaning: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (bools refused), or None when ``optional``.

    The message names the setting, the value and what is expected: ``max_seqs is 0; expected a
    positive int or None``; ``meaning`` adds what the number counts, e.g. ``(tokens per batch)``.
    """
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        expected = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{name} is {value!r}; expected {expected}{f' ({meaning})' if meaning else ''}")
