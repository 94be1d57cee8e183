"""The package's version, in one place (``neuralreg.__version__``; setup.py keeps the same string)."""

__version__ = "0.1.0"
