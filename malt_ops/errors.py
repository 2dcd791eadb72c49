"""User-facing errors: one line that says what to fix."""


class MaltError(Exception):
    """An error caused by input or configuration; the CLI prints it as one line and exits 2."""


class RegistryUnavailable(MaltError):
    """The model registry could not answer: a fault to retry, never read as "no champion".

    The CLI exits with RETRYABLE_EXIT (75, EX_TEMPFAIL) for it instead of 2."""
