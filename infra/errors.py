"""What marks an error as a problem with what the user gave (a URL list, a folder, an image set, a configuration that
leaves nothing to train on), not with the code: its message says what is wrong and how to fix it, so the console
shows that message and no traceback (Prefect's own records of the failure keep theirs in the Prefect UI)."""

from __future__ import annotations


class InputProblem(Exception):
    """Mixed into the project's input errors: `UrlListError`, `DatasetError`, `UnsafeArchiveError`,
    `EmptyCorpusError`."""


def is_input_problem(err: BaseException | None) -> bool:
    """Whether ``err``, or an error it was raised from, is an :class:`InputProblem`."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, InputProblem):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False
