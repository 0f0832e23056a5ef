"""The one error type of ``data_prep``: an input that cannot be converted, named in the message."""

from ddmpi.data.schema import DatasetError


class PrepError(DatasetError):
    """A source file or option is missing, corrupt, truncated or mislabelled.

    The message starts with the offending file (or option) so that the command line can print it
    as the single line of its failure.
    """
