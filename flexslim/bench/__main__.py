"""`python -m flexslim.bench SPEC_JSON RESULT_PATH`: one bench run in its own process (`worker.main`).

The entry is a package's `__main__` because multiprocessing's spawn does not re-import such a module in the
children it starts: the isolated timing helper of a worker started as `-m flexslim.bench.worker` re-imported the
worker, and torch with it (~2 s per helper on the 2-core CPU), before it could time anything.
"""

if __name__ == "__main__":
    import sys

    from flexslim.bench.worker import main

    main(sys.argv[1:])
