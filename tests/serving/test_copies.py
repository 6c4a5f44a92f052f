"""The API server's adapter copies (`serving.copies`), without a server: what the worker reads,
the timeout that keeps a slow disk from holding anyone, and the server's own storage errors."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from flora_vllm.config import FLoRAConfig
from flora_vllm.serving import copies


@pytest.fixture
def config(monkeypatch, tmp_path):
    """Settings with the copies under tmp_path and a 0.5 s read timeout; a fresh folder."""
    cfg = FLoRAConfig(snapshot_dir=str(tmp_path / "copies"), read_timeout_s=0.5)
    monkeypatch.setattr(copies, "get_config", lambda: cfg)
    monkeypatch.setattr(copies, "_folder", None)
    return cfg


def _adapter(tmp_path) -> str:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "FLORA", "r": 1}')
    (folder / "flora_model.safetensors").write_bytes(b"\0" * 100)
    return str(folder)


def test_prepare_copies_the_folder_and_reads_its_type(config, tmp_path):
    src = _adapter(tmp_path)
    copy, peft_type = asyncio.run(copies.prepare(src))
    assert peft_type == "FLORA" and copies.is_copy(copy) and not copies.is_copy(src)
    assert sorted(os.listdir(copy)) == sorted(os.listdir(src))
    assert asyncio.run(copies.prepare(str(tmp_path / "missing"))) is None  # vLLM's 404
    copies.discard(copy)
    deadline = time.monotonic() + 10
    while os.path.exists(copy) and time.monotonic() < deadline:  # removed in the reader pool
        time.sleep(0.01)
    assert not os.path.exists(copy)


def test_a_read_that_outlasts_the_timeout_answers_at_the_timeout(config, tmp_path):
    """The caller gets AdapterReadTimeoutError after read_timeout_s while the event loop keeps
    running; the copy made once the disk answers is removed, not leaked."""
    src, disk = _adapter(tmp_path), threading.Event()
    made: list[str] = []

    def slow(path: str) -> tuple[str, str | None]:
        disk.wait(30)  # a disk that answers only when the test says so
        made.append(copies._prepare(path)[0])
        return made[-1], "FLORA"

    async def scenario() -> tuple[float, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        with pytest.raises(copies.AdapterReadTimeoutError, match="FLORA_ADAPTER_READ_TIMEOUT_S"):
            await copies.off_loop(slow, src, what="adapter folder 'x'")
        took = time.monotonic() - started
        task.cancel()
        return took, ticks

    took, ticks = asyncio.run(scenario())
    assert 0.5 <= took < 5 and ticks > 10  # the loop ran while the read waited
    disk.set()
    deadline = time.monotonic() + 10
    while not (made and not os.path.exists(made[0])) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert made and not os.path.exists(made[0]), "the late copy was left on disk"


def test_copies_of_dead_servers_are_swept_and_storage_errors_are_named(config, tmp_path):
    root = config.snapshot_root()
    os.makedirs(os.path.join(root, "server-999999999-x"))  # no such process
    os.makedirs(os.path.join(root, f"server-{os.getpid()}-y"))  # alive: this one
    asyncio.run(copies.prepare(_adapter(tmp_path)))
    left = os.listdir(root)
    assert "server-999999999-x" not in left and f"server-{os.getpid()}-y" in left

    blocked = FLoRAConfig(snapshot_dir=str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")
    copies._folder = None
    copies.get_config = lambda: blocked  # monkeypatch restores it
    with pytest.raises(copies.CopyStorageError, match="FLORA_SNAPSHOT_DIR"):
        asyncio.run(copies.prepare(str(tmp_path / "src")))




def test_reads_queue_for_a_slot_and_a_given_up_read_never_runs(config):
    """READERS reads hang (a hung disk): the next read waits for a slot and times out; once the
    disk answers, that read is skipped (its caller gave up), and the threads were daemons (a
    hung read never holds up the process's exit)."""
    disk, ran = threading.Event(), []

    def hung(i: int) -> None:
        disk.wait(30)

    async def scenario() -> None:
        stuck = [copies._start(hung, i) for i in range(copies.READERS)]
        with pytest.raises(copies.AdapterReadTimeoutError):
            await copies.off_loop(ran.append, "queued", what="x")
        assert all(not c.done() for c in stuck)
        assert all(t.daemon for t in threading.enumerate() if t.name == "flora-adapter-read")
        disk.set()
        for c in stuck:
            await asyncio.wrap_future(c)

    asyncio.run(scenario())
    for t in threading.enumerate():  # the queued read's thread too: it ran or skipped by now
        if t.name == "flora-adapter-read":
            t.join(10)
    assert ran == []


def test_a_hung_disk_cannot_pile_up_reader_threads(config, monkeypatch):
    """With every reader thread alive (running or waiting for a slot), a further read is a
    503-class error at once, without a new thread; freed threads are taken again."""
    monkeypatch.setattr(copies, "_threads", threading.Semaphore(copies.READERS + 1))
    disk = threading.Event()
    stuck = [copies._start(disk.wait, 30) for _ in range(copies.READERS + 1)]
    alive = threading.active_count()
    # not the timeout's message: refused before any wait, and no thread was started for it
    with pytest.raises(copies.AdapterReadTimeoutError, match="already waiting on the disk"):
        asyncio.run(copies.off_loop(os.getcwd, what="x"))
    assert threading.active_count() == alive
    disk.set()
    for call in stuck:
        call.result(10)
    for t in threading.enumerate():
        if t.name == "flora-adapter-read":
            t.join(10)
    assert asyncio.run(copies.off_loop(os.getcwd, what="x")) == os.getcwd()
