"""The errors lambdalake raises for its users: one base, a few kinds.

A :class:`LambdalakeError`'s message is the whole story for the person who ran the command:
what went wrong and what to do. The command line prints it as one line and exits 1
(``lambdalake: error: ...``); anything else that escapes is a bug and keeps its traceback.
Each kind also derives from the builtin it refines, so ``except ValueError`` keeps working.

>>> issubclass(InvalidInput, ValueError) and issubclass(InvalidInput, LambdalakeError)
True
"""

from __future__ import annotations


class LambdalakeError(Exception):
    """A failure explained by its message, for the user (see the module docstring)."""


class InvalidInput(LambdalakeError, ValueError):
    """An argument, setting or request that cannot be used; the message says what to send."""


class OperationFailed(LambdalakeError, RuntimeError):
    """The lake, the broker or a process is in a state that stops the operation; the message
    says which and what to do (nothing was written twice or lost)."""


class Unreachable(LambdalakeError, TimeoutError):
    """A broker, topic or service did not answer in time."""
