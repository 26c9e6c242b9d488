"""``python -m clustersim`` is the ``clustersim`` command."""
import sys

from clustersim.cli import main

if __name__ == "__main__":        # not when a worker re-imports the main module (mpi4py.futures)
    sys.exit(main())
