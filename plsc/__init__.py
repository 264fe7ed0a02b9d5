"""PLSC: Paddle Large Scale Classification.

Importing plsc sets ``OMP_NUM_THREADS`` to all cores when it is unset
(see :func:`plsc.runtime.set_thread_default`).
"""

from plsc.runtime import set_thread_default

set_thread_default()

__version__ = "0.1.0"
