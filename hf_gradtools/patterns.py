"""Select parameters by regular-expression name patterns, failing loudly when a pattern selects nothing.

A name is selected when any pattern matches somewhere in it (`re.search`), so `"classifier"` selects
`classifier.weight` and `classifier.bias`, and `r"layer\\.0\\."` every parameter of block 0. Anchor a pattern
(`^...$`) to select one exact name.

Example:
    >>> names = ["bert.encoder.layer.0.output.dense.weight", "classifier.weight", "classifier.bias"]
    >>> match_names(names, ["^classifier\\\\."], field="grad_snapshot_tensors")
    ['classifier.weight', 'classifier.bias']
    >>> match_names(names, ["pooler"], field="grad_snapshot_tensors")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `grad_snapshot_tensors` pattern 'pooler' matches no parameter; ...
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

# How many names an error message lists as examples.
_SHOWN = 5


def compile_patterns(patterns: Iterable[str], field: str) -> list[re.Pattern]:
    """Compile `patterns`, raising a `ValueError` naming `field` for a pattern that is not a valid regex."""
    if isinstance(patterns, str):
        raise ValueError(f"`{field}` must be a list of patterns, got the string {patterns!r}: use [{patterns!r}].")
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"`{field}` must hold regular-expression strings, got {pattern!r}.")
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"`{field}` pattern {pattern!r} is not a valid regular expression: {error}.") from None
    return compiled


def example_names(names: Sequence[str]) -> str:
    """A few of `names` for an error message, e.g. `'a.weight', 'a.bias' (and 7 more)`."""
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    rest = len(names) - _SHOWN
    return shown + (f" (and {rest} more)" if rest > 0 else "") if names else "none"


def match_names(names: Sequence[str], patterns: Iterable[str], field: str, require_each: bool = True) -> list[str]:
    """The names, in their given order, that any pattern matches (`re.search`).

    Args:
        names: candidate parameter names.
        patterns: regular expressions.
        field: the setting the patterns came from, named in errors.
        require_each: raise when a pattern matches none of `names`.

    Raises:
        ValueError: a pattern is not a valid regex, or (with `require_each`) matches no name; the message names
            `field`, the pattern and a few of the names.
    """
    compiled = compile_patterns(patterns, field)
    if require_each:
        for regex in compiled:
            if not any(regex.search(name) for name in names):
                close = difflib.get_close_matches(re.sub(r"[\\^$]", "", regex.pattern), list(names), n=3, cutoff=0.6)
                near = f"; the closest names: {', '.join(close)}" if close else ""
                raise ValueError(
                    f"`{field}` pattern {regex.pattern!r} matches no parameter{near}; parameter names look like: "
                    f"{example_names(list(names))}."
                )
    return [name for name in names if any(regex.search(name) for regex in compiled)]


def check_patterns(model, settings) -> None:
    """Fail before training when a pattern of `agc_exclude` (with `clip_algorithm="agc"`) or
    `grad_snapshot_tensors` matches no parameter of `model`; `settings`: a `GradSettings` or arguments."""
    names = [name for name, _ in model.named_parameters()]
    if getattr(settings, "clip_algorithm", "norm") == "agc":
        match_names(names, list(getattr(settings, "agc_exclude", None) or []), field="agc_exclude")
    match_names(names, list(getattr(settings, "grad_snapshot_tensors", None) or []), field="grad_snapshot_tensors")
