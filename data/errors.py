"""Errors for data that is not where a dataset expects it."""

from __future__ import annotations


class MissingDataError(FileNotFoundError):
    """A built-in dataset's files are missing; the message says which package provides them."""


def missing_data(
    what: str, path: object, install: str, root_param: str = "data.params.root"
) -> MissingDataError:
    """The error every built-in dataset raises: what is missing, how to install it, how to point elsewhere."""
    return MissingDataError(
        f"{what} not found at {path}. Install it with `{install}` (scripts/setup.sh does this), "
        f"or point `root` at your own copy of the same files "
        f"(`{root_param}=/path/to/folder` on the command line)."
    )
