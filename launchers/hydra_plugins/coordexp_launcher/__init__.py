"""coordexp's Hydra launcher plugin (``hydra/launcher=coordexp``); see ``coordexp_launcher.py``."""

__version__ = "0.1.0"
