"""Entry point of the frozen bundle: ``viewer.app:main`` (the ``ich-viewer`` gui-script)."""

import multiprocessing

from viewer.app import main

if __name__ == "__main__":
    multiprocessing.freeze_support()  # a no-op unless a library starts worker processes
    raise SystemExit(main())
