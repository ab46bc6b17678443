"""The advisor's version: a leaf module, so anything may import it without a cycle."""

__version__ = "0.1.0"
