"""One exception type for every user-facing failure: the CLI prints its message and exits 1, no traceback."""


class MoegrokError(Exception):
    """Bad input or state the user can fix. The message names the file, key or field and what was expected."""
