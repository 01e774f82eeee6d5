"""The base of every error a user can fix by changing the data, the weights or the configuration.

Each message names the input and the setting or command that fixes it. ``run.py`` prints a ``UserError`` as one line
and exits with status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback); any other exception keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected error: bad input, missing weights or files, or an invalid setting."""

    def __str__(self) -> str:  # KeyError-style subclasses would quote the message
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(UserError):
    """A setting that cannot work; the message names the key and its valid values. Not a ``ValueError``, so that no
    handler of bad data can take it for one (a sample is skipped only for ``SampleSkipped``)."""
