"""User-facing errors: one short message naming the problem and the fix.

The command line prints these without a traceback (``debug=true`` shows it).
"""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong format)."""


class ConfigError(UserError):
    """The configuration is invalid; raised before any data is read."""


class DataError(UserError):
    """A dataset is missing, empty or in the wrong format."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or for another architecture."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class ExportError(UserError):
    """A packed base or adapter file is missing, unreadable or of another kind."""


class FingerprintError(ExportError):
    """An adapter was trained on another base than the one it is attached to."""
