"""The package's version (``empathy_models.__version__``), kept equal to pyproject.toml's."""

__version__ = "0.1.0.dev0"
