"""The error type for bad user input: the CLIs print its message on one line and exit non-zero."""


class LegoError(ValueError):
    """A problem with what the user gave (a dataset, a checkpoint, an option), with what to do about it."""
