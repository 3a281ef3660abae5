"""`python -m snapshotter` runs the sociable-snapshotter command line."""

from .cli import main

main()
