"""The package version (also `fastcxr.__version__`), importable from any layer."""

__version__ = "0.1.0"
