"""The version of keras-seht."""

__version__ = "0.1.0"
