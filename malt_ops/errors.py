"""User-facing errors: one line that says what to fix."""


class MaltError(Exception):
    """An error caused by input or configuration; the CLI prints it as one line and exits 2."""
