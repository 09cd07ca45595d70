"""The one base class for bad user input that every stage raises.

Commands catch `InputError` and print one line naming the field and the fix, exit code 2, never
a traceback. Every module's own user-error class (ConfigError, SuiteError, ModelError,
AdapterError, LayoutError, TrainInputError, ZooMismatchError, ...) subclasses it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input a user can fix: the message names the field or file and says how."""
