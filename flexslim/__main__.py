"""`python -m flexslim ...` (and so `torchrun ... -m flexslim ...`): the same CLI as the `flexslim` command."""

if __name__ == "__main__":
    from flexslim.system.children import adopt_from_env

    adopt_from_env()  # started by a flexslim job (a sweep's gate): end with it
    from flexslim.cli.commands import main

    main()
