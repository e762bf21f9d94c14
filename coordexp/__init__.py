"""coordexp: Stage-2 (Channel A/B) training toolkit for coordinate-token detectors."""

__version__ = "0.1.0"
