"""Exceptions raised for bad user input. Each message is one sentence that says what to do."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters, or its type's name when it has none (for
    the parenthesis of a one-sentence error)."""
    text = str(exc)
    return text.splitlines()[0][:limit] if text.strip() else type(exc).__name__


class SVDAdapterError(ValueError):
    """Base class: a configuration, target or file problem the user can fix."""


class SVDConfigError(SVDAdapterError):
    """An invalid `SVDAdapterConfig` (unknown method, bad rank, pattern, ...)."""


class SVDTargetError(SVDAdapterError):
    """`target_modules` matched nothing usable, or a rank does not fit a matched module."""


class SVDAdapterFileError(SVDAdapterError):
    """An adapter file that cannot be applied: unreadable, foreign, or for another base model."""
