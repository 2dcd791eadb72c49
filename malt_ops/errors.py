"""User-facing errors: one line that says what to fix."""

import re

CONFIG_ERROR_EXIT = 2
"""What the CLI exits with on a MaltError: retrying the same command cannot help."""


class MaltError(Exception):
    """An error caused by input or configuration; the CLI prints it as one line and exits 2."""


class RegistryUnavailable(MaltError):
    """The model registry could not answer: a fault to retry, never read as "no champion".

    The CLI exits with RETRYABLE_EXIT (75, EX_TEMPFAIL) for it instead of 2."""


_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """``text`` with the user:password of every URI in it replaced (``https://***@host``).

    For every line that may show a URI: params, log lines, errors (MLflow's own messages
    repeat the request URL, credentials included).
    """
    return _URI_CREDENTIALS.sub(r"\g<scheme>***@", text)
