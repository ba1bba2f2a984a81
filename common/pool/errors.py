"""The pool's errors (every backend raises these; one line each, naming what is wrong)."""


class PoolError(RuntimeError):
    """Base class of the pool's errors."""


class PoolTimeout(PoolError):
    """A blocking call waited past its timeout (the message says what it waited for)."""


class RecordCorrupt(PoolError):
    """A stored record failed to decode or its checksum did not match."""
