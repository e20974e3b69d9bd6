"""`python -m basinmerge`: the command line."""

from basinmerge.cli import main

main()
