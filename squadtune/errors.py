"""The one error type of bad user input, shared by the core, the config and the CLI."""


class InputError(ValueError):
    """Bad input from the user (config, data file, request): the message says what to fix."""
