"""Errors meant for users. Messages name the file, row and field wherever they can."""

from __future__ import annotations


class CxrmaxError(Exception):
    """An error with a message meant for the user. The CLI prints it without a traceback and exits 2."""


class InputError(CxrmaxError):
    """Bad input data: a missing file, a wrong column, a value out of range.

    Build messages with `where()` so that they always say where the problem is."""


class ImageError(InputError):
    """An image file that cannot be read or decoded (the message names the path and the reason)."""


def where(path: object, row: int | None = None, field: str | None = None) -> str:
    """Format a location like ``file.csv.gz row 12 field 'Edema'`` (row numbers are 1-based data rows)."""
    text = str(path)
    if row is not None:
        text += f" row {row}"
    if field is not None:
        text += f" field {field!r}"
    return text
