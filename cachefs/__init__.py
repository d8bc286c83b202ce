"""cachefs: versioned ML datasets with a git-like CLI, served through a tiered-cache FUSE mount."""

__version__ = "0.1.0"
