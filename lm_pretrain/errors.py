"""The one exception type a user is meant to read: the CLI prints it without a traceback."""


class LmpError(Exception):
    """A problem with the user's input (recipe, corpus, checkpoint) that names the fix."""
