"""The base of the errors kclip raises for bad input a user can fix (a missing path, an unindexed shard, a store
that does not match its dataset). The command line prints them as `kclip <command>: error: <message>` and exits
with status 2; everything else is a bug and keeps its traceback."""


class KclipError(Exception):
    """Bad input, with a message naming the input, what is wrong with it and what to run."""
