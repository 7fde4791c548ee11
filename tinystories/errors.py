"""The one exception type for mistakes a user can make (bad path, bad flag, wrong file).

The command line catches it and prints its message as a single line on stderr with exit code 2,
never a traceback. Anything else that escapes is a bug in tinystories and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""
