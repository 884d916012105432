"""Exceptions with messages that name the offending argument and the fix."""


class MLMDError(Exception):
    """Base class of mlmd's own errors."""


class InputError(MLMDError, ValueError):
    """Bad user input: names the argument (or file and field) and how to fix it."""


class ModelFileError(MLMDError, ValueError):
    """A model file that cannot be used: not TorchScript, no metadata, newer contract."""


class DataError(MLMDError, ValueError):
    """A data set that cannot be used for training: missing labels, bad frames."""


class MissingDependency(MLMDError, ImportError):
    """An optional package is not installed: names it and the ``pip install`` that adds it."""


def missing_dependency(package: str, extra: str, purpose: str) -> ImportError:
    """An ImportError with the install hint for an optional dependency."""
    return MissingDependency(f"{purpose} needs the optional package {package!r}; install it with "
                       f"`pip install 'mlmd[{extra}]'` (or `pip install {package}`)")
