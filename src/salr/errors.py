"""Errors a user can fix. The CLI prints these as one line instead of a traceback."""


class SALRError(ValueError):
    """Bad input or a bad file: the message says what was wrong and what to do."""
