"""The one exception type for bad input a user can fix; the CLI turns it into a usage error."""


class DataError(ValueError):
    """Bad input (paths, options, data): the message says what is wrong and what is allowed."""
