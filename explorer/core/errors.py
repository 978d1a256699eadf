"""The one exception type for mistakes a user can make (bad prompt, bad index, bad file).

Pages and the CLI catch only this type and show its message; anything else is a bug.
"""


class ExplorerInputError(ValueError):
    """A user-fixable problem. The message says what to change."""
