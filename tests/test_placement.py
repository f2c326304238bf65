"""The queen's placement, tested in process: keep-alive durations and memory sizes as users write
them, a node's view from its hive's /v1/resources and its caps, and plan_placement's order
(PROTOCOL.md §12). The hives' answers here have the shape Hive.resources gives; the end-to-end
tests (test_scheduler.py) run the same decisions against real hives over real ssh."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
import rbee  # noqa: E402

MODEL, OTHER = "file:/models/a.gguf", "file:/models/b.gguf"


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("1.5m", 90), (5, 5), ("5", 5), ("0", 0),
    ("-1", -1), (-1, -1), ("-5m", -300), (2.5, 2.5)])
def test_durations_read_as_ollama_reads_keep_alive(text, seconds):
    assert rbee.duration_s(text) == seconds


@pytest.mark.parametrize("text", ["abc", "", "5x", "m", True, None, [], float("nan")])
def test_what_is_no_duration_is_none_and_a_400_in_a_request(text):
    assert rbee.duration_s(text) is None
    if text is not None:
        with pytest.raises(rbee.InvalidRequest) as caught:
            rbee.keep_alive_of({"keep_alive": text}, 300)
        assert caught.value.details == {"field": "keep_alive"}


def test_a_request_keep_alive_defaults_and_negative_means_forever():
    assert rbee.keep_alive_of({}, 300) == 300
    assert rbee.keep_alive_of({"keep_alive": None}, 7) == 7
    assert rbee.keep_alive_of({"keep_alive": "-10m"}, 300) == -1
    assert rbee.keep_alive_of({"keep_alive": 0}, 300) == 0


@pytest.mark.parametrize("text, mb", [("8G", 8192), ("512M", 512), ("1.5G", 1536), ("2GB", 2048), ("300m", 300),
                                      ("1T", 1 << 20), (str(3 << 20), 3), ("1GiB", 1024)])
def test_sizes_read_as_users_write_them(text, mb):
    assert rbee.size_mb(text) == mb


@pytest.mark.parametrize("text", ["x", "", "-1G", "1Q", "G"])
def test_what_is_no_size_is_none(text):
    assert rbee.size_mb(text) is None


def test_human_durations():
    assert [rbee.human_duration(s) for s in (0, 2, 90, 300, 5400, -1)] == ["0s", "2s", "1m30s", "5m", "1h30m",
                                                                            "forever"]


# -- a node's view -----------------------------------------------------------------------------

def resources(node, ram_free=16000, workers=(), cuda=(), cataloged=False, size=None):
    """A hive's /v1/resources answer (Hive.resources' shape)."""
    devices = {"cpu": [{"index": 0, "name": "x86_64", "memory_total_mb": 32000, "memory_free_mb": ram_free}]}
    memory = {"cpu": "ram"}
    if cuda:
        devices = dict({"cuda": [{"index": i, "name": "GPU", "memory_total_mb": 24000, "memory_free_mb": free}
                                 for i, free in enumerate(cuda)]}, **devices)
        memory["cuda"] = "vram"
    return {"node": node, "ram_total_mb": 32000, "ram_free_mb": ram_free, "devices": devices, "memory": memory,
            "workers": list(workers), "models": [],
            "model": {"model_ref": MODEL, "cataloged": cataloged, "size_bytes": size}}


def worker(worker_id, model=MODEL, backend="cpu", device=0, memory=500, busy=0, queued=0, slots=4, idle_since=100,
           state=None):
    return {"worker_id": worker_id, "model_ref": model, "backend": backend, "device": device,
            "state": state or ("busy" if busy else "idle"), "memory_mb": memory, "slots_total": slots,
            "slots_available": slots - busy, "queue_length": queued, "last_activity_unix": idle_since}


def view(res, max_ram=None, max_vram=None, pending=(), loads=None):
    return rbee.node_view(res, {"max_ram_mb": max_ram, "max_vram_mb": max_vram}, pending, loads)


def test_a_cap_limits_what_rbee_may_take_beside_its_own_workers():
    v = view(resources("mac", ram_free=16000, workers=[worker("w1", memory=700)]), max_ram=1000)
    assert v["devices"] == [{"backend": "cpu", "device": 0, "pool": ("ram",), "free_mb": 300, "room_mb": 300,
                             "reserved_mb": 0}]
    v = view(resources("mac", ram_free=200), max_ram=1000)   # the machine itself has less than the cap
    assert v["devices"][0]["free_mb"] == 200


def test_vram_is_per_device_and_its_cap_counts_that_device_only():
    res = resources("ws", cuda=(10000, 20000), workers=[worker("g", backend="cuda", device=1, memory=3000)])
    v = view(res, max_vram=8000)
    free = {(d["backend"], d["device"]): d["free_mb"] for d in v["devices"]}
    assert free == {("cuda", 0): 8000, ("cuda", 1): 5000, ("cpu", 0): 16000}


def test_spawns_in_progress_reserve_memory_and_appear_as_loading_workers():
    pending = [{"node": "mac", "model_ref": OTHER, "backend": "cpu", "device": 0, "need_mb": 600, "parallel": 2}]
    v = view(resources("mac", ram_free=5000), max_ram=1000, pending=pending)
    assert v["devices"][0]["free_mb"] == 400
    [loading] = v["workers"]
    assert (loading["model_ref"], loading["state"], loading["slots_total"]) == (OTHER, "loading", 2)


def test_a_spawn_in_progress_reserves_only_what_its_listed_worker_has_not_taken_yet():
    """The hive lists a loading worker with its RSS so far: that is gone from ram_free_mb and counts
    in the cap's use already, so the spawn's reservation is its need less that, never below 0."""
    pending = [{"node": "mac", "model_ref": OTHER, "backend": "cpu", "device": 0, "need_mb": 600, "parallel": 2}]
    before = view(resources("mac", ram_free=5000), max_ram=1000, pending=pending)["devices"][0]
    assert (before["free_mb"], before["reserved_mb"]) == (400, 600)
    loading = worker("w2", model=OTHER, memory=250, state="loading")
    v = view(resources("mac", ram_free=4750, workers=[loading]), max_ram=1000, pending=pending)
    assert (v["devices"][0]["free_mb"], v["devices"][0]["reserved_mb"]) == (400, 350)   # as before it was listed
    assert [w["worker_id"] for w in v["workers"]] == ["w2"]   # (no second, unlisted one beside it)
    uncapped = view(resources("mac", ram_free=4750, workers=[loading]), pending=pending)["devices"][0]
    assert uncapped["free_mb"] == 4400
    # loaded, and more than the estimate said: nothing left to reserve, not less than nothing
    loaded = worker("w2", model=OTHER, memory=700)
    v = view(resources("mac", ram_free=4300, workers=[loaded]), max_ram=1000, pending=pending)
    assert (v["devices"][0]["free_mb"], v["devices"][0]["reserved_mb"]) == (300, 0)
    # a worker of the model that has served requests is not the one being spawned: the whole need is reserved
    served = dict(worker("w1", model=OTHER, memory=300), jobs_total=5)
    v = view(resources("mac", ram_free=4700, workers=[served]), max_ram=1000, pending=pending)
    assert (v["devices"][0]["free_mb"], v["devices"][0]["reserved_mb"]) == (100, 600)


def test_handed_out_tasks_count_until_the_worker_shows_them():
    res = resources("mac", workers=[worker("w1", busy=1)])
    v = view(res, loads=lambda key: 3 if key == ("mac", MODEL, "cpu", 0) else 0)
    assert v["workers"][0]["load"] == 3
    assert view(res, loads=lambda key: 0)["workers"][0]["load"] == 1


# -- plan_placement's order --------------------------------------------------------------------

def plan(need_mb, *views, **kw):
    return rbee.plan_placement(MODEL, need_mb, list(views), **kw)


def test_a_new_model_goes_where_most_memory_is_free():
    p = plan(400, view(resources("mac"), max_ram=300), view(resources("workstation"), max_ram=2048),
             view(resources("localhost"), max_ram=100))
    assert (p.action, p.node, p.backend, p.device, p.evict) == ("spawn", "workstation", "cpu", 0, ())
    assert p.reason == "workstation cpu:0: 2.0 GB free" and p.free_mb == 2048


def test_a_node_that_has_the_model_cataloged_comes_before_more_free_memory():
    p = plan(200, view(resources("mac", cataloged=True), max_ram=300), view(resources("workstation"), max_ram=2048))
    assert (p.node, p.reason) == ("mac", "mac cpu:0: model cached, 300 MB free")


def test_gpus_come_before_the_cpu_unless_a_backend_is_named():
    ws = view(resources("ws", ram_free=30000, cuda=(6000, 9000)))
    assert (plan(1000, ws).backend, plan(1000, ws).device) == ("cuda", 1)
    assert plan(1000, ws, backend="cpu").backend == "cpu"
    assert plan(1000, ws, backend="cuda", device=0).device == 0


def test_a_worker_with_a_free_slot_is_reused_before_any_spawn():
    busy = worker("w1", busy=3)
    p = plan(400, view(resources("mac", workers=[busy]), max_ram=600), view(resources("workstation"), max_ram=4096))
    assert (p.action, p.node, p.worker_id) == ("reuse", "mac", "w1")
    assert "free slot (3 of 4 busy)" in p.reason


def test_every_slot_taken_starts_a_replica_elsewhere_up_to_max_replicas():
    full = worker("w1", busy=4, queued=2)
    mac, ws = view(resources("mac", workers=[full]), max_ram=1000), view(resources("workstation"), max_ram=4096)
    p = plan(400, mac, ws)
    assert (p.action, p.node) == ("spawn", "workstation") and "a replica" in p.reason
    p = plan(400, mac, ws, max_replicas=1)
    assert (p.action, p.node, p.worker_id) == ("reuse", "mac", "w1") and "it queues" in p.reason
    # with two workers, the least loaded one gets the task
    other = worker("w2", busy=1)
    p = plan(400, mac, view(resources("workstation", workers=[other]), max_ram=4096))
    assert (p.action, p.worker_id) == ("reuse", "w2")


def test_no_room_stops_idle_workers_least_recently_used_first():
    old = worker("old", model=OTHER, memory=300, idle_since=100)
    new = worker("new", model=OTHER + "2", memory=300, idle_since=200)
    mac = view(resources("mac", workers=[new, old]), max_ram=800)   # 200 MB free
    p = plan(400, mac)
    assert (p.action, [w for _, w, _ in p.evict]) == ("spawn", ["old"])
    assert p.free_mb == 500 and "once 1 idle worker(s) unload" in p.reason
    p = plan(700, mac)
    assert [w for _, w, _ in p.evict] == ["old", "new"]


def test_a_busy_worker_is_never_stopped_the_task_waits_for_it():
    busy = worker("b", model=OTHER, memory=600, busy=1)
    p = plan(400, view(resources("mac", workers=[busy]), max_ram=800))
    assert (p.action, p.evict) == ("wait", ()) and "mac" in p.reason


def test_a_cap_lowered_under_what_runs_counts_from_below_zero():
    """mac's cap went from 2G to 100M under an idle 350 MB worker: stopping it leaves 100 MB, not
    350, so a 113 MB model neither evicts it nor waits for it."""
    v = view(resources("mac", workers=[worker("w", model=OTHER, memory=350)]), max_ram=100)
    assert (v["devices"][0]["free_mb"], v["devices"][0]["room_mb"]) == (0, -250)
    with pytest.raises(rbee.InsufficientRam):
        plan(113, v)
    assert plan(90, v).evict == (("mac", "w", OTHER),)


def test_nothing_fits_anywhere_says_each_nodes_free_memory():
    with pytest.raises(rbee.InsufficientRam) as caught:
        plan(900, view(resources("mac"), max_ram=300), view(resources("workstation"), max_ram=500))
    err = caught.value
    assert err.details == {"required_mb": 900, "free_mb": {"mac": {"cpu:0": 300}, "workstation": {"cpu:0": 500}}}
    assert "mac: cpu:0 300 MB free" in err.message and "nodes set" in err.suggestion
    with pytest.raises(rbee.VramExhausted):
        plan(20000, view(resources("ws", cuda=(6000,))), backend="cuda")


def test_an_unknown_size_places_by_free_memory_and_leaves_the_check_to_the_hive():
    p = plan(0, view(resources("mac"), max_ram=300), view(resources("workstation"), max_ram=2048))
    assert (p.node, p.free_mb) == ("workstation", 2048)
    busy = worker("w", model=OTHER, memory=300, busy=1)   # a node with nothing left is no place even then
    assert plan(0, view(resources("mac", workers=[busy]), max_ram=300)).action == "wait"
    with pytest.raises(rbee.InsufficientRam):
        plan(0, view(resources("mac", ram_free=0)))


def test_a_backend_or_device_no_node_has_is_said_so():
    with pytest.raises(rbee.BackendUnavailable):
        plan(100, view(resources("mac")), backend="cuda")
    with pytest.raises(rbee.DeviceNotFound):
        plan(100, view(resources("ws", cuda=(6000,))), backend="cuda", device=3)


def test_a_reused_worker_carries_its_devices_room_and_memory_being_loaded_can_be_waited_for():
    p = plan(100, view(resources("mac", workers=[worker("w1", busy=1)]), max_ram=1000))
    assert (p.action, p.free_mb) == ("reuse", 500)
    pending = [{"node": "mac", "model_ref": OTHER, "backend": "cpu", "device": 0, "need_mb": 900, "parallel": 4}]
    assert plan(800, view(resources("mac"), max_ram=1000, pending=pending)).action == "wait"
