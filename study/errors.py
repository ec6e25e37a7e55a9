"""The project's one error type. Every mistake a user can make (a bad spec, trial config, dataset,
environment, selection of runs) raises a `StudyError`, whose message is one line naming the problem;
the command lines print it as `error: MESSAGE` and exit with status 2."""

from __future__ import annotations

import re

_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


class StudyError(Exception):
    """A mistake the user can fix; the message is one line (its line breaks escaped)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """`text` with its line breaks escaped (\\n), so that an error message stays one line."""
    return _LINE_BREAKS.sub(lambda match: repr(match.group())[1:-1], text)


def first_line(err: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of an error (at most `limit` characters), or its type's name."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines:
        return lines[0][:limit]
    return type(err).__name__ if isinstance(err, BaseException) else ""
