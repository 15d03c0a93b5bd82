"""`python -m yem ...` runs the yem command."""

from yem.cli import main

main()
