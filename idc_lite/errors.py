"""Errors a user can act on.

Every error raised for bad input, a bad model or a bad artifact is an :class:`IdcError` whose message
is one line naming the file (or model id) and the problem. The CLI prints it and exits with code 2;
anything else reaching the top is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class IdcError(Exception):
    """Base class: a problem with what the user gave us, not a bug in idc-lite."""

    def __init__(self, subject: str | os.PathLike | None, problem: str):
        self.subject = None if subject is None else os.fspath(subject)
        self.problem = problem
        super().__init__(problem if self.subject is None else f"{self.subject}: {problem}")

    def __reduce__(self):  # raised in a child process (``export`` runs big encoders in one), re-raised here
        return type(self), (self.subject, self.problem)


class InputError(IdcError):
    """An image (or folder of images) that cannot be used."""


class ModelError(IdcError):
    """A model that cannot be found, read, or is not a BLIP-2 model."""


class AdapterError(IdcError):
    """A LoRA adapter that cannot be found, read, is unsafe, or does not fit the model."""


class ArtifactError(IdcError):
    """An idc-lite artifact directory that is incomplete, tampered with or of another format."""


class DatasetError(IdcError):
    """A dataset file or record that cannot be read."""


class OptionError(IdcError):
    """Options that do not go together or do not apply (a lite-only option for the reference backend, ...)."""


class MissingExtraError(IdcError):
    """A feature whose optional dependencies are not installed; the message names the extra to install."""


def require(module: str, feature: str, extra: str) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` can be imported: ``feature`` needs the ``extra``.

    Only checks that the module is installed (``importlib.util.find_spec``); importing it stays with
    the caller, so a check costs no start-up time.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(None, f"{feature} needs {module}: pip install 'idc-lite[{extra}]'")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
