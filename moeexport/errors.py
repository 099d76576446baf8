"""The one exception type users see.

Library code raises `MoeExportError` with a message that names the problem and
the fix; the CLI prints it on one line and exits with status 2.
"""


class MoeExportError(Exception):
    """A user-facing error: bad input, an impossible recipe, a missing dependency."""


def read_user_text(path, what: str) -> str:
    """A user's text file (recipe, calibration or evaluation text) as str, or one MoeExportError line.

    The file must be UTF-8 (a leading byte-order mark is dropped) and hold no NUL bytes:
    a binary file given by mistake is named, not decoded into a traceback or into garbage.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MoeExportError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}): "
            "is it the right file? re-encode it as UTF-8"
        ) from None
    if "\0" in text:
        offset = data.index(b"\0")
        raise MoeExportError(f"{what} {path} holds NUL bytes at offset {offset}: it is a binary file, not text")
    return text


class ContextFull(MoeExportError):
    """A conversation no longer fits the runtime's context: an interactive chat says so and goes on."""
