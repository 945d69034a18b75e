"""The verdict cache shared by every replica, in Redis or Valkey (``identity.cache.shared``).

``sidecar.redis_url`` reads where it lives; ``record`` is what a verdict and a fleet message look like
there (parsed strictly: anything else is a miss); ``store`` talks to Redis: the second cache
level, the fleet-wide single-flight lock, and the purge messages. ``cache.VerdictCache``
keeps its local LRU in front: a hit there never touches Redis.
"""
