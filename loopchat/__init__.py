"""loopchat: a chat service that gets better from its own users."""

__version__ = "0.1.0"
