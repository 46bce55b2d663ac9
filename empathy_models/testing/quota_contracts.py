"""
`QuotaStoreContract`, also importable from `empathy_models.testing.contracts` (where it
lives, in ``contracts/_quota.py``).
"""

from .contracts._quota import QuotaStoreContract as QuotaStoreContract

__all__ = ["QuotaStoreContract"]
