"""``plain_repr`` is Celery's ``saferepr`` wherever it answers (the batch publish's argsrepr and
kwargsrepr), for any JSON value: the message headers stay what ``send_task`` would write."""

from __future__ import annotations

from typing import Any

from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_ext.dispatch import plain_repr

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=600, deadline=None)
@given(value=json_values, maxlen=st.sampled_from([10, 50, 1024]), maxlevels=st.sampled_from([1, 2, 3]))
def test_plain_repr_is_saferepr_or_none(value: Any, maxlen: int, maxlevels: int) -> None:
    fast = plain_repr(value, maxlen, maxlevels)
    if fast is not None:
        assert fast == saferepr(value, maxlen, maxlevels=maxlevels)


def test_plain_repr_answers_the_usual_payloads_and_leaves_the_rest_to_saferepr() -> None:
    value = {"to": "a@b.c", "n": [1, 2.5, None, True]}
    assert plain_repr(value, 1024, 3) == repr(value) == saferepr(value, 1024)
    assert plain_repr((), 1024, 3) == "()"
    assert plain_repr(("x",), 1024, 3) == "('x',)"
    assert plain_repr({"q": "it's"}, 1024, 3) is None  # repr re-quotes it
    assert plain_repr({"s": "a\nb"}, 1024, 3) is None  # repr escapes it
    assert plain_repr({"a": {"b": {"c": {}}}}, 1024, 3) is None  # saferepr cuts it at 3 levels
    assert plain_repr({"k": "v" * 2000}, 1024, 3) is None  # saferepr truncates it
