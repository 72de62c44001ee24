"""lambdalake: a Lambda-architecture analytics system for retail data.

This is the small shared package: settings, event contracts, lake paths, the
run-manifest protocol, view definitions and the CLI. The three layers
(``batch``, ``speed``, ``serving``) import it and never each other.
"""

__version__ = "0.1.0"
