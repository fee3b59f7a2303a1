"""One exception type for every mistake a user can make.

The CLI turns a `UserError` into a one-line message on stderr and exit code 2, with no
traceback (the original exception stays chained for `MDLM_DMMD_DEBUG=1`). Code deeper down
raises it wherever a config value, path or file is wrong, naming the key and what is accepted.
"""


class UserError(ValueError):
    """A wrong input from the user: bad config value, missing file, unknown name."""
