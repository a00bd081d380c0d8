"""The operator's stores: watch events keep them, full listings correct them (controller/stores.py),
and the work queue's priorities (a user's edit goes ahead of the look at every model)."""

from __future__ import annotations

import asyncio
import time

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


def test_a_packed_store_reads_copies_and_sees_no_change_in_the_same_content():
    store = Store(packed=True)
    body = {"metadata": {"name": "m", "labels": {"a": "1"}}, "spec": {"replicas": 1}}
    assert store.put("u1", ("ns", "m"), body) == {("ns", "m")}
    [read] = store.get(("ns", "m"))
    assert read == body and read is not body
    read["spec"]["replicas"] = 5  # a reader's change stays its own
    assert store.value_of("u1") == body
    # The same content again (a re-list, keys in another order) is no change; other content is.
    assert store.put("u1", ("ns", "m"), {"spec": {"replicas": 1}, "metadata": {"labels": {"a": "1"}, "name": "m"}}) == set()
    assert store.resync({"u1": (("ns", "m"), dict(reversed(list(body.items()))))}, started=time.monotonic()) == []
    assert store.put("u1", ("ns", "m"), {**body, "spec": {"replicas": 2}}) == {("ns", "m")}


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


def test_a_full_listing_fills_the_stores_page_by_page_and_drops_a_pod_the_watches_missed():
    from slmfleet.api.config import OperatorConfig
    from slmfleet.controller import registry
    from slmfleet.controller.runtime import Runtime
    from tests.sizing_nodes import gpu_node, gpu_pod

    node = {"apiVersion": "v1", "kind": "Node", **gpu_node("n0", "NVIDIA-L4", 23034, 2)}
    model = {"metadata": {"name": "m", "namespace": "ns", "uid": "m-uid", "generation": 1}, "spec": {}}
    holder = {**gpu_pod("n0", 1, uid="p1"), "metadata": {"name": "p1", "namespace": "ns", "uid": "p1"}}
    listings = {"smallmodels": [[model]], "nodes": [[node]], "pods": [[holder], []]}
    pages_read = []

    class Client:
        async def list_pages(self, api_version, plural, namespace=None, label_selector=None):
            for page in listings.get(plural, [[]]):
                pages_read.append(plural)
                yield page

    config = OperatorConfig.model_validate({
        "vllmImage": "vllm/vllm-openai@sha256:" + "a" * 64, "loaderImage": "slmfleet/slmfleet@sha256:" + "b" * 64})
    rt = Runtime(config=config, client=Client())  # type: ignore[arg-type]
    asyncio.run(registry.sync(rt, []))
    assert pages_read.count("pods") == 2
    assert [e.free for e in rt.cluster.inventory().nodes] == [1]
    assert rt.indices["slm_models"].get(("ns", "m")) == [model]
    assert rt.queue.busy  # every model is looked at after a listing

    listings["pods"] = [[]]  # deleted while no watch saw it
    asyncio.run(registry.sync(rt, []))
    assert [e.free for e in rt.cluster.inventory().nodes] == [2]
