"""`python -m flexslim ...`: the same command line as the `flexslim` script."""

from flexslim.cli import main

main()
