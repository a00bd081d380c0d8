"""The operator's stores: watch events keep them, full listings correct them (controller/stores.py),
and the work queue's priorities (a user's edit goes ahead of the look at every model)."""

from __future__ import annotations

import asyncio

from slmfleet.controller.stores import Store
from slmfleet.controller.workqueue import BACKGROUND, URGENT, WorkQueue


def test_a_listing_drops_what_it_lacks_and_adds_what_it_has():
    store = Store()
    store.put("u1", ("ns", "m"), {"v": 1}, at=1.0)
    store.put("u2", ("ns", "m"), {"v": 2}, at=1.0)  # deleted while the watch was gone: a phantom
    changes = store.resync({"u1": (("ns", "m"), {"v": 1}), "u3": (("ns", "n"), {"v": 3})}, started=5.0)
    assert sorted(id_ for id_, *_ in changes) == ["u2", "u3"]
    assert store.get(("ns", "m")) == [{"v": 1}] and store.get(("ns", "n")) == [{"v": 3}]
    assert len(store) == 2


def test_an_event_newer_than_the_listing_wins_over_it():
    store = Store()
    store.put("u1", ("ns", "m"), {"v": 1}, at=1.0)
    store.put("u1", None, None, at=6.0)  # deleted after the listing began; the listing still has it
    store.put("u2", ("ns", "m"), {"v": 2}, at=7.0)  # created after the listing began; not in it
    store.put("u3", ("ns", "m"), {"v": 9}, at=8.0)  # changed after the listing began
    changes = store.resync({"u1": (("ns", "m"), {"v": 1}), "u3": (("ns", "m"), {"v": 0})}, started=5.0)
    assert changes == []
    assert sorted(v["v"] for v in store.get(("ns", "m"))) == [2, 9]


def test_a_listing_brings_a_missed_change_and_a_move_between_keys():
    store = Store()
    store.put("r1", ("ns", "model-a"), {"ref": "a"}, at=1.0)
    store.put("p1", "all", {"phase": "Running"}, at=1.0)
    changes = store.resync({"r1": (("ns", "model-b"), {"ref": "b"}), "p1": (None, {"phase": "Succeeded"})}, started=2.0)
    assert {id_: changed for id_, _, _, changed in changes} == {"r1": {("ns", "model-a"), ("ns", "model-b")},
                                                                "p1": {"all"}}
    assert store.get(("ns", "model-a")) == () and store.get(("ns", "model-b")) == [{"ref": "b"}]
    assert store.get("all") == ()


def test_an_urgent_key_goes_ahead_of_background_ones_and_a_key_moves_up():
    async def run() -> list:
        queue = WorkQueue()
        for i in range(5):
            queue.add(("ns", f"m{i}"), BACKGROUND)
        queue.add(("ns", "m3"))  # a watch event for a waiting model: it moves up to NORMAL
        queue.add(("ns", "edited"), URGENT)
        queue.add(("ns", "edited"), BACKGROUND)  # no move down
        order = []
        while queue.busy:
            key = await queue.get()
            order.append(key[1])
            queue.done(key)
        return order

    assert asyncio.run(run()) == ["edited", "m3", "m0", "m1", "m2", "m4"]


def test_a_key_added_while_processing_comes_back_at_its_priority():
    async def run() -> list:
        queue = WorkQueue()
        queue.add("a", BACKGROUND)
        queue.add("b", BACKGROUND)
        first = await queue.get()
        queue.add(first, URGENT)  # changed while being reconciled
        queue.done(first)
        return [await queue.get(), await queue.get()]

    assert asyncio.run(run()) == ["a", "b"]
