"""femd: the Federated Execution Manager daemon."""

__version__ = "0.1.0"
