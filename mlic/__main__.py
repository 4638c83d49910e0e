"""``python -m mlic`` does what the ``mlic`` command does."""

from mlic.cli import main

main()
