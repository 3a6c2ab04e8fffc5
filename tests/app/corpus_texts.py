"""The small corpus of the app's tests: a markdown page on the store, a Python file, a text note."""

CACHE_DOC = """# The factor-cache store

The store keeps prefix pages of factor caches on disk. Each entry is keyed by a chained sha256 over the
namespace, the parent key and the token ids of the page, so the same prefix always finds the same entry.

A namespace is the sha256 of the model fingerprint, the factor dtype and the RoPE settings.
"""

MODEL_CODE = '''"""Attention in factor space."""


def attention(aq, bq, ak, bk, av, bv):
    """Tensor product attention: queries, keys and values are sums of rank-one products."""
    return softmax(aq @ bq @ (ak @ bk).T) @ (av @ bv)


def rope(x, positions):
    """Rotary position embedding applied to the token factors only."""
    return rotate(x, positions)
'''

NOTES = "Paris is the capital of France.\n" * 3 + "The Eiffel tower is in Paris.\n"
