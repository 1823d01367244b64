"""Hypothesis strategies shared by the property tests of message handlers."""

from __future__ import annotations

from hypothesis import strategies as st


def json_values(names: list[str], max_leaves: int = 10) -> st.SearchStrategy:
    """JSON values of random shape (what a buggy or hostile peer could put in a header):
    scalars of every JSON type, with ``names`` (ids, channels, router names) mixed in
    so that some values pass the first checks, nested in lists and objects."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                        st.floats(allow_nan=False), st.text(max_size=8), st.sampled_from(names))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
        max_leaves=max_leaves)
