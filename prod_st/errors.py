"""The one exception type the CLI turns into a one-line error and exit code 2."""


class ProdStError(Exception):
    """A user-facing error: bad input, missing files, unknown names. The message is one line that says what
    was wrong and what to do; the CLI prints it without a traceback."""
