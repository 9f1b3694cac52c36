"""Atomic writes for the commands (one implementation, in ``data.atomic``)."""

from data.atomic import atomic_write, atomic_write_text

__all__ = ["atomic_write", "atomic_write_text"]
