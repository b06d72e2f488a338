"""The test cluster's informers (tests/cluster.py's Informer, what Cluster(watch=True) and the control-plane
benchmark read instead of listing) on the real API server: they follow creates, changes and deletions, never go
back to an older copy, and never bring back a deleted object."""

from __future__ import annotations

import copy

from .apiserver import ApiServer
from .cluster import CachingRest, Informer, wait_until


def test_an_informer_follows_the_server_and_keeps_the_newest_copy(apiserver: ApiServer, namespace: str):
    rest = CachingRest(apiserver.kubeconfig)
    before = rest.create("configmaps", namespace, {"metadata": {"name": "listed"}, "data": {"v": "0"}})
    informer = Informer(rest, "configmaps", namespace).start()
    rest.informers["configmaps"] = informer
    try:
        assert informer.get("listed")["data"] == {"v": "0"}  # the list before the watch
        created = rest.create("configmaps", namespace, {"metadata": {"name": "watched"}, "data": {"v": "1"}})
        assert informer.get("watched")["metadata"]["uid"] == created["metadata"]["uid"]  # a write of ours: at once
        changed = rest.patch("configmaps", namespace, "listed", {"data": {"v": "2"}})
        informer.put(before)  # a late event with the older copy
        assert informer.get("listed")["data"] == {"v": "2"}
        rest.request("PATCH", rest.path("configmaps", namespace, "watched"), {"data": {"v": "3"}},
                     "application/merge-patch+json")  # fmt: skip
        wait_until(lambda: (informer.get("watched") or {}).get("data") == {"v": "3"}, 30, "the watch's change")
        rest.delete("configmaps", namespace, "listed")
        wait_until(lambda: informer.get("listed") is None, 30, "the watch's deletion")
        informer.put(copy.deepcopy(changed))  # an answer that comes back after the deletion was seen
        assert informer.get("listed") is None and {o["metadata"]["name"] for o in informer.items()} == {"watched"}
        assert informer.errors == []
    finally:
        informer.stop()
        rest.close()
