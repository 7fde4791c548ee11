"""The one exception type for mistakes a user can make (bad path, bad flag, wrong file).

The command line catches it and prints its message as a single line on stderr with exit code 2,
never a traceback. Anything else that escapes is a bug in tinystories and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


def one_line(message) -> str:
    """A message folded onto one line, as every error is printed (a library's text, such as a
    parser's, may span several)."""
    return " ".join(str(message).split())


# Exit status of `tinystories train` when a stop request (Ctrl-C, SIGTERM) ended the run early:
# checkpoints/last was saved and `--resume` continues it. Distinct from 0 (the run finished), 2 (a
# UserError) and 130 (a second Ctrl-C quit at once); 75 is sysexits.h's EX_TEMPFAIL, "try again later".
EXIT_STOPPED = 75
