"""The exceptions the CLI turns into a one-line error: exit code 2 for a usage error, 3 for a data error, 4 for a
full disk."""


class ProdStError(Exception):
    """A user-facing error: bad input, missing files, unknown names. The message is one line that says what
    was wrong and what to do; the CLI prints it without a traceback and exits with `exit_code`."""

    exit_code = 2


class DataError(ProdStError):
    """A data file that was found but whose contents cannot be used: malformed or non-UTF-8 lines, an empty
    file, a repeated id, judgements naming ids absent from the files. The CLI exits 3."""

    exit_code = 3


class DiskFullError(ProdStError):
    """A file system filled up while prod-st wrote to it (`prod_st.util.paths.disk_full_error`). Nothing half-written
    is trusted afterwards: the same command, once there is space, resumes from the last finished step. The CLI
    exits 4."""

    exit_code = 4
