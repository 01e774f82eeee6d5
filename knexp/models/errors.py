"""Errors a model can raise that the user can fix: each message names the setting or command that fixes it."""

from __future__ import annotations

from knexp.user_errors import UserError


class ModelError(UserError, RuntimeError):
    """Base of knexp's model errors (``run.py`` prints these without a traceback's noise)."""


class ModelWeightsMissing(ModelError, FileNotFoundError):
    """Weights for a configured model are absent; the message names the config key to set."""


class OfflineWeightsMissing(ModelWeightsMissing):
    """An offline model package or one of its files is absent; the message names it and ``make install``."""


class ProjectorWeightsError(ModelError):
    """The projector file is missing or unreadable; the message names it and how to restore it."""


class BatchTooLarge(ModelError):
    """Out of memory even with one row per batch."""
