"""Errors of the data layer that the user can fix; each message names the file or entry and the setting to change."""

from __future__ import annotations

from knexp.errors import UserError


class DatasetError(UserError, FileNotFoundError):
    """A dataset file is missing or unreadable; the message names it and the config key to fix."""


class ImageError(DatasetError):
    """One image cannot be used (missing, truncated or corrupt, or sized unlike its entry); ``kind`` is its fault kind
    (``knexp.data.validation.FAULT_KINDS``). Stages skip such an image and list it with the reason."""

    def __init__(self, message: str, kind: str = "image_unreadable"):
        super().__init__(message)
        self.kind = kind
