"""Exceptions shared by trainer, calibration and runtime.

Every message is one line that names the file or field and says what was expected,
so a CLI can print ``str(exc)`` and exit without a traceback.
"""

from __future__ import annotations


class PoutaError(Exception):
    """Base class: a problem the user can fix from the message alone."""


class ImageReadError(PoutaError):
    """An image file is missing, unreadable or not decodable."""


class MetadataError(PoutaError):
    """A model's metadata file is missing, malformed, or disagrees with the model."""


class ConfigError(PoutaError):
    """A config file or CLI value is invalid."""


class UnavailableError(PoutaError):
    """Something the runtime needs is not there yet (a port cannot be bound: the NIC is
    not up, another process holds it); a restart later can succeed."""
