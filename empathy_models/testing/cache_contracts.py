"""
`ResponseCacheContract`, also importable from `empathy_models.testing.contracts` (where
it lives, in ``contracts/_cache.py``).
"""

from .contracts._cache import ResponseCacheContract as ResponseCacheContract

__all__ = ["ResponseCacheContract"]
