"""The feedback store: completions, thumbs, comparisons, corrections, cycles. Imports no other room."""

from feedback.store import Store

__all__ = ["Store"]
