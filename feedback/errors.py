"""What the store refuses, in the store's own words; the gateway maps each to an HTTP status."""

from __future__ import annotations


class FeedbackError(Exception):
    """A write the store refuses; `param` names the request field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class NotFound(FeedbackError):
    """The completion or comparison does not exist."""


class NotYours(FeedbackError):
    """It exists but belongs to another user."""


class Invalid(FeedbackError):
    """The request contradicts what is stored (e.g. a choice index the completion does not have)."""
