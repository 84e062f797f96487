"""The one exception the data layer raises for input a user can fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input or setting; the message is one line naming the file or setting and the fix."""
