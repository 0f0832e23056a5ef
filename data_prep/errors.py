"""The one error type of ``data_prep``: an input that cannot be converted, named in the message."""

from ddmpi.data.inputs import InputError

# A source file or option is missing, corrupt, truncated or mislabelled; the message starts with
# the offending file (or option). The same class as the single-file loaders' error.
PrepError = InputError
