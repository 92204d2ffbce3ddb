"""dockyard: build-and-run engine for ML training jobs."""
__version__ = "0.1.0"
