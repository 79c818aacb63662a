"""The cyclic collector is paused while a bookkeeping step runs and restored as it was, also on errors."""

import gc

import pytest

from vqpipe.gcpause import without_cyclic_gc


def test_paused_inside_restored_after():
    @without_cyclic_gc
    def inner():
        return gc.isenabled()

    @without_cyclic_gc
    def outer(fail):
        seen = (gc.isenabled(), inner(), gc.isenabled())  # a nested step leaves it paused
        if fail:
            raise ValueError("boom")
        return seen

    assert gc.isenabled()
    assert outer(False) == (False, False, False) and gc.isenabled()
    with pytest.raises(ValueError):
        outer(True)
    assert gc.isenabled()
    gc.disable()
    try:
        inner()
        assert not gc.isenabled()  # paused by the caller: stays paused
    finally:
        gc.enable()
