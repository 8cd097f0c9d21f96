"""`python -m flexslim ...` (and so `torchrun ... -m flexslim ...`): the same CLI as the `flexslim` command."""

from flexslim.cli.commands import main

if __name__ == "__main__":
    main()
