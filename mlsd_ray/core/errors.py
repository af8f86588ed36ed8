"""Errors that map to the CLI's exit codes: 2 for bad usage or input, 1 for failed work."""

__all__ = ["InputError", "Interrupted", "MlsdError", "WorkError"]


class MlsdError(Exception):
    """Base class: the message is meant for the user, without a traceback."""

    exit_code = 1


class InputError(MlsdError):
    """The user gave something we cannot use (a bad flag, path, config key, or data). Exit 2."""

    exit_code = 2


class WorkError(MlsdError):
    """The inputs were fine but the work failed. Exit 1."""

    exit_code = 1


class Interrupted(MlsdError):
    """The user stopped the work (Ctrl-C); what was done is saved. Exit 130."""

    exit_code = 130
