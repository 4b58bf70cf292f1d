"""The one exception type for errors a user can cause (bad file, bad value, unknown name).

The CLI turns a DigitlabError into a single line on stderr and exit status 2.
"""

from __future__ import annotations


class DigitlabError(Exception):
    """A problem with user input: the message names the file/line/value and what was expected."""
