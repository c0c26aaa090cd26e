"""`python -m tailor_operator` is the `tailor` command."""

from tailor_operator.cli import main

main()
