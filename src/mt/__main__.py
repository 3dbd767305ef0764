"""`python -m mt` runs the command line."""

from mt.cli import main

main()
