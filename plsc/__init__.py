"""PLSC: Paddle Large Scale Classification.

Paddle forces ``OMP_NUM_THREADS=1`` at import when the variable is unset, which silently makes every CPU run
single-threaded. We choose deliberately instead: the environment wins, otherwise all cores.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

__version__ = "0.1.0"
