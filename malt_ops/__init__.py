"""malt-ops: a production pipeline for MALT multi-agent post-training."""

__version__ = "0.1.0"
