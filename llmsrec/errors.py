"""Errors that the CLI turns into one line on stderr and exit code 2."""


class InputError(Exception):
    """Bad user input: a file, line or field that cannot be used.

    The message is one line and names what was wrong (file, line, field), e.g.
    ``reviews.jsonl line 17: field 'parent_asin' missing``.
    """
