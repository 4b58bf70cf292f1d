"""The one exception type for errors a user can cause (bad file, bad value, unknown name).

The CLI turns a DigitlabError into a single line on stderr and exit status 2.
"""

from __future__ import annotations


class DigitlabError(Exception):
    """A problem with user input: the message names the file/line/value and what was expected."""


def missing(path: object, what: str, folder: bool) -> DigitlabError:
    """The error for a path that is not the file or folder a command needs: it says whether the
    path is absent or the other kind (a folder given for a CSV file, a file for a run folder)."""
    from pathlib import Path

    p = Path(str(path))
    if p.exists():
        found = "a file" if p.is_file() else ("a folder" if p.is_dir() else "not a regular file")
        return DigitlabError(f"{p}: {found}, expected {what}")
    return DigitlabError(f"{p}: no such {'folder' if folder else 'file'} (expected {what})")
