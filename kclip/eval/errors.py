"""The error evaluation raises for bad input (a checkpoint, a dataset or a store that cannot be evaluated)."""

from kclip.errors import KclipError


class EvalError(KclipError, ValueError):
    """Bad evaluation input; the message names the input and what is wrong with it."""
