import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process (safeshape demo --jobs) imports it
    sys.exit(main())
