"""``python -m resunetpp``: the same command line as the ``resunetpp`` console script."""

from resunetpp.cli import main

if __name__ == "__main__":
    main()
