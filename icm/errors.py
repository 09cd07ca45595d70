"""The one base class for bad user input that every stage raises.

Commands catch `InputError` (and the older specific errors) and print one line naming the field
and the fix, exit code 2, never a traceback. Stage modules subclass it for their own errors.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input a user can fix: the message names the field or file and says how."""
