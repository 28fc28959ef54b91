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


def printable(text: object) -> str:
    """``text`` safe to print: control and format characters (escape sequences, newlines, bidi overrides)
    written as ``\\x..`` / ``\\u....`` escapes, so that names read from a file can neither move the cursor,
    retitle or clear the terminal, nor start a line of their own."""
    import unicodedata  # noqa: PLC0415

    out = []
    for ch in str(text):
        if unicodedata.category(ch)[0] == "C":
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
