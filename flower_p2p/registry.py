"""Registries and config errors, defined at the bottom layer (``strategies.registry``).

Re-exported here so the app's modules import them from their own package; the pure strategies
below never import the app.
"""

from strategies.registry import ConfigError, Registry

__all__ = ["ConfigError", "Registry"]
