"""The package version, in a module of its own: every stage reads it from here, none imports the package root."""
__version__ = "0.1.0"
