"""Errors a person can act on: the CLI prints them as one line and exits non-zero."""


class Qwen35Error(Exception):
    """Base of every error caused by input (a file, a flag, a request), not by a bug."""


class FormatError(Qwen35Error):
    """A model file that is unreadable, truncated, forged, or of a kind we do not support."""


class UnknownNameError(Qwen35Error):
    """A model, quant or GPU name we do not know; the message suggests close names."""
