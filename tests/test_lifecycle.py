"""Adapter lifetime without timers: reference counts per adapter id (`flora_vllm.lifecycle`), the
per-request leased LoRARequest, the worker's by-id adapter set, and the engine core's defenses."""

from __future__ import annotations

import gc
import queue
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from flora_vllm.hooks import api_server, engine, worker_step
from flora_vllm.lifecycle import AdapterLifecycle

# --- the count -----------------------------------------------------------------------------------


def test_retire_waits_for_the_last_reference():
    life, released = AdapterLifecycle(), []
    life.acquire(7)
    life.acquire(7)
    life.retire(7, lambda: released.append(7))
    assert released == [] and life.retired() == {7}
    life.release(7)
    assert released == []
    life.acquire(7)  # a request that resolved the id before the unload still gets it
    life.release(7)
    life.release(7)
    assert released == [7] and life.retired() == set() and life.refs(7) == 0


def test_retire_of_an_unused_id_releases_at_once():
    life, released = AdapterLifecycle(), []
    life.retire(3, lambda: released.append(3))
    life.retire(3, lambda: released.append(3))  # twice retired, never used
    assert released == [3, 3]  # each retirement of an idle id releases (the engine is idempotent)
    life.acquire(4)
    life.retire(4, lambda: released.append(4))
    life.retire(4, lambda: released.append(-4))  # the first callback is kept
    life.release(4)
    assert released == [3, 3, 4]


def test_release_more_than_acquired_is_an_error():
    life = AdapterLifecycle()
    life.acquire(1)
    life.release(1)
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        life.release(1)


def test_a_failing_release_is_logged_not_raised(caplog):
    life = AdapterLifecycle()

    def boom() -> None:
        raise OSError("engine gone")

    life.retire(9, boom)
    assert "releasing adapter id 9 failed" in caplog.text


def test_lease_follows_the_owner_object():
    life, released = AdapterLifecycle(), []

    class Owner:
        pass

    owner = Owner()
    life.lease(owner, 5)
    life.retire(5, lambda: released.append(5))
    gc.collect()
    assert released == [] and life.refs(5) == 1  # alive: still held
    del owner
    gc.collect()
    assert released == [5] and life.refs(5) == 0


def test_counts_stay_exact_under_threads():
    """8 threads take and give back 2,000 references each while the id is retired midway:
    exactly one release, and only after the very last reference."""
    life, released = AdapterLifecycle(), []
    start = threading.Barrier(9)
    life.acquire(11)  # the main thread's own reference keeps the id alive until the end

    def worker() -> None:
        start.wait()
        for _ in range(2000):
            life.acquire(11)
            life.release(11)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    start.wait()
    life.retire(11, lambda: released.append(life.refs(11)))
    for t in threads:
        t.join()
    assert released == []
    life.release(11)
    assert released == [0]


# --- the leased LoRARequest ----------------------------------------------------------------------


def test_leased_request_holds_its_id_until_garbage():
    from vllm.lora.request import LoRARequest
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from flora_vllm.lifecycle import ADAPTERS

    plain = LoRARequest("tenant", 4242, "/adapters/tenant")
    copy = api_server.leased(plain)
    assert ADAPTERS.refs(4242) == 1
    # Same adapter for vLLM: equal and hashed by name both ways, sent to the engine core as is.
    assert copy == plain and plain == copy and hash(copy) == hash(plain)
    assert len({copy, plain}) == 1
    decoded = MsgpackDecoder(LoRARequest).decode(MsgpackEncoder().encode(copy))
    assert type(decoded) is LoRARequest and decoded.lora_int_id == 4242
    released = []
    ADAPTERS.retire(4242, lambda: released.append(True))
    assert released == []
    del copy
    gc.collect()
    assert released == [True] and ADAPTERS.refs(4242) == 0


def test_pinned_request_resolves_to_its_id_after_the_name_changed():
    from vllm.lora.request import LoRARequest

    from flora_vllm.lifecycle import ADAPTERS

    old, new = LoRARequest("a", 501, "/x"), LoRARequest("a", 502, "/x")
    registry = {"a": new}  # the name now points at the reloaded id

    def stock(self, request):  # the name lookup of vLLM's BaseServing._maybe_get_adapters
        return registry[request.model]

    resolve = api_server._wrap_maybe_get_adapters(stock)
    request, other = SimpleNamespace(model="a"), SimpleNamespace(model="a")
    unpin = api_server.pin_adapter(request, old)
    assert resolve(None, request).lora_int_id == 501  # the id resolved before the reload
    assert resolve(None, other).lora_int_id == 502  # everyone else: the name's current id
    assert ADAPTERS.refs(501) == 1
    unpin()
    gc.collect()
    assert ADAPTERS.refs(501) == 0


# --- worker: the step's adapters by id ------------------------------------------------------------


def test_step_adapters_are_distinct_by_id_not_by_name():
    """The KeyError that killed the engine: two ids of one adapter name in one batch."""
    from vllm.lora.request import LoRARequest
    from vllm.v1.worker.gpu_input_batch import InputBatch

    stock = getattr(InputBatch.make_lora_inputs, "__wrapped__", InputBatch.make_lora_inputs)
    old, new = LoRARequest("flora-05", 80, "/a"), LoRARequest("flora-05", 88, "/a")
    batch = SimpleNamespace(
        num_reqs=3,
        request_lora_mapping=np.array([80, 88, 0]),
        lora_id_to_lora_request={80: old, 88: new},
    )
    ones = np.ones(3, dtype=np.int32)
    _, token_map, collapsed = stock(batch, ones, ones)
    assert set(token_map) == {80, 88, 0} and len(collapsed) == 1  # the upstream defect
    _, token_map, requests = worker_step._active_loras_by_id(stock)(batch, ones, ones)
    assert {r.lora_int_id for r in requests} == {80, 88}


# --- engine core: no removal under a scheduled request, a removed id fails alone -----------------


class FakeCore:
    """The parts of vLLM's EngineCoreProc the hooks use."""

    def __init__(self) -> None:
        self.scheduler = SimpleNamespace(requests={})
        self.removed: list[int] = []
        self.errors: list[str] = []
        self.added: list[str] = []
        self.output_queue = queue.Queue()  # (client index, EngineCoreOutputs) to the API server

    def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True

    def add_lora(self, lora_request) -> bool:
        return True

    def add_request(self, request, request_wave: int = 0) -> None:
        self.added.append(request.request_id)
        self.scheduler.requests[request.request_id] = request

    def abort_requests(self, request_ids) -> None:
        for r in request_ids:
            self.scheduler.requests.pop(r, None)

    def _send_error_outputs_to_client(self, req_ids, client_index) -> None:
        self.errors += req_ids


@pytest.fixture
def core(monkeypatch) -> FakeCore:
    for name, wrap in (
        ("remove_lora", engine._wrap_core_remove_lora),
        ("add_lora", engine._wrap_core_add_lora),
        ("add_request", engine._wrap_core_add_request),
        ("abort_requests", engine._wrap_core_after),
    ):
        monkeypatch.setattr(FakeCore, name, wrap(getattr(FakeCore, name)))
    return FakeCore()


def _request(request_id: str, lora_id: int | None):
    from vllm.lora.request import LoRARequest

    lora = None if lora_id is None else LoRARequest(f"a{lora_id}", lora_id, "/x")
    return SimpleNamespace(request_id=request_id, lora_request=lora, client_index=0)


def test_engine_core_defers_removal_while_a_request_is_scheduled(core):
    core.add_request(_request("r1", 6))
    core.remove_lora(6)
    assert core.removed == []  # r1 still needs the weights
    core.abort_requests(["r1"])
    assert core.removed == [6]  # gone with its last request


def _refused(core: FakeCore) -> list[tuple[str, str]]:
    """(request id, stop_reason) of every error output the engine core sent to its client."""
    from vllm.v1.engine import FinishReason

    out = []
    while not core.output_queue.empty():
        _, outputs = core.output_queue.get()
        for o in outputs.outputs:
            assert o.finish_reason == FinishReason.ERROR
            assert o.request_id in outputs.finished_requests
            out.append((o.request_id, o.stop_reason))
    return out


def test_engine_core_fails_only_the_request_of_a_removed_id(core):
    core.remove_lora(8)
    core.add_request(_request("late", 8))
    core.add_request(_request("other", None))
    assert core.added == ["other"]
    [(request_id, reason)] = _refused(core)  # the reason travels to the API server (a 503)
    assert request_id == "late" and reason.startswith(engine.GONE_MARK)
    assert "adapter 'a8' (id 8) was unloaded from the engine before request late" in reason
    core.add_lora(_request("x", 8).lora_request)  # loaded again: served again
    core.add_request(_request("again", 8))
    assert core.added == ["other", "again"]
