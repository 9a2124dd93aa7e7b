"""Ray actors and everything they own: models, KV caches, kernels, devices."""

from actors import threads as _threads

_threads.apply()  # before anything imports torch (see actors/threads.py)
