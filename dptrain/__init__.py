"""dptrain: a data-loading-centric trainer for intra-/inter-class diversity experiments."""

__version__ = "0.1.0"
