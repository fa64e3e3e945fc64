"""The one exception type for mistakes a user can fix; the command line prints it as one line."""


class MoalignError(Exception):
    """A problem with the user's input (config, data, weights, paths), reported before work starts."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): library errors span pages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
