"""Command-line interface (``resnetlab ...``); see :mod:`resnetlab.cli.main`."""
