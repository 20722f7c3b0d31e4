"""slimsd's version, in a module of its own: the package's __init__ imports the models, which record it."""

__version__ = "0.1.0"
