"""Exceptions raised for bad user input. Each message is one sentence that says what to do."""


class SVDAdapterError(ValueError):
    """Base class: a configuration, target or file problem the user can fix."""


class SVDConfigError(SVDAdapterError):
    """An invalid `SVDAdapterConfig` (unknown method, bad rank, pattern, ...)."""


class SVDTargetError(SVDAdapterError):
    """`target_modules` matched nothing usable, or a rank does not fit a matched module."""


class SVDAdapterFileError(SVDAdapterError):
    """An adapter file that cannot be applied: unreadable, foreign, or for another base model."""
