"""Errors of the node shell.

    NodeError
    ├── ConfigError        configuration is missing or invalid
    └── ModelPullError     a model could not be downloaded, verified or imported
"""


class NodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(NodeError):
    """Configuration is missing or invalid."""


class ModelPullError(NodeError):
    """A model could not be downloaded, verified or imported."""
