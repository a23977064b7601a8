"""Loaders for peer libraries' reference implementations, used by tests under the ``refs`` marker."""
