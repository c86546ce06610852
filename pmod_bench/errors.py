"""Exceptions shared by the CLI and the library."""


class UserError(Exception):
    """Bad input from the user: the CLI prints it as one clear line and exits with code 2."""
