"""The one exception type for mistakes a user can fix; the command line prints it as one line."""


class MoalignError(Exception):
    """A problem with the user's input (config, data, weights, paths), reported before work starts."""
