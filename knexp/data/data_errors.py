"""Errors of the data layer that the user can fix; each message names the file or entry and the setting to change."""

from __future__ import annotations

from knexp.user_errors import UserError


class DatasetError(UserError, FileNotFoundError):
    """A dataset file is missing or unreadable; the message names it and the config key to fix."""


class EntryError(DatasetError):
    """One entry cannot be used (an image, an annotation's mask); stages skip it and list it with the reason. With
    ``data.strict=true`` the data layer raises a plain ``DatasetError`` instead, which stops the run."""


class ImageError(EntryError):
    """One image cannot be used (missing, truncated or corrupt, or sized unlike its entry); ``kind`` is its fault kind
    (``knexp.data.validation.FAULT_KINDS``)."""

    def __init__(self, message: str, kind: str = "image_unreadable"):
        super().__init__(message)
        self.kind = kind
