"""The one error type a user sees: a bad value, named, with what is allowed."""


class SlimsdError(ValueError):
    """Bad input from the user. The CLI prints it as one line and exits with code 2."""


def unknown(what: str, value: object, allowed) -> SlimsdError:
    """An error for a value outside a closed set: names the value and lists what is allowed."""
    return SlimsdError(f"unknown {what} {value!r}; allowed: {', '.join(sorted(str(a) for a in allowed))}")
