"""The serving process's heap once warm: garbage freed first, what is left frozen out of the collector's walks, and
settled again after a reload frees what the frozen objects held."""

from __future__ import annotations

import gc
import weakref

from appliance.server import settle_heap


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_settling_frees_garbage_cycles_then_freezes_the_rest_until_it_is_settled_again():
    alive, garbage = Node(), Node()
    garbage_ref = weakref.ref(garbage)
    del garbage
    try:
        settle_heap()
        assert garbage_ref() is None  # collected first, not frozen with the rest
        assert gc.get_freeze_count() > 0 and not any(o is alive for o in gc.get_objects())
        replaced = weakref.ref(alive)  # as a reload replaces a model: frozen, then garbage
        del alive
        gc.collect()
        assert replaced() is not None  # frozen objects are never walked, so never freed
        settle_heap()
        assert replaced() is None
    finally:
        gc.unfreeze()
