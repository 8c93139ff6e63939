"""Errors that name the file, key or argument at fault."""


class SafeshapeError(Exception):
    """Bad input: the message says which file, key or argument, and what is wrong with it."""


class CheckpointError(SafeshapeError):
    """A checkpoint or adapter on disk is missing something, or does not match another."""
