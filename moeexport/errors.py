"""The one exception type users see.

Library code raises `MoeExportError` with a message that names the problem and
the fix; the CLI prints it on one line and exits with status 2.
"""


class MoeExportError(Exception):
    """A user-facing error: bad input, an impossible recipe, a missing dependency."""
