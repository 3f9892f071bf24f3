"""The package version, in one place: pyproject.toml reads it from here (without
importing the C extension) and ``adaloss.__version__`` re-exports it."""
__version__ = "0.1.0"
