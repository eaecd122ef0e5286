"""`python -m magic_cli ...` is `magic ...`."""

from magic_cli.cli import entry

entry()
