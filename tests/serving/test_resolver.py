"""Adapters served from a folder on first use (`flora_vllm.serving.resolver`), on a real vLLM
server.

One server with an adapter root and no adapter named at start-up: 256 rank-1 FLoRA tenants
resolved on first use, 64 concurrent, every answer equal to the dense merged model; then 64
distinct tenants in the engine at once (more than `--max-cpu-loras` = 96 in the folder, so
evicted ones come back from disk); a LoRA folder too; every refusal with its status and reason
(403 outside the root, 404 missing, 400 broken) while the server keeps serving; RSS bounded.
FLoRA slots hold rank 1 (FLORA_MAX_RANK=1) next to LoRA slots of rank 8.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from reference import ask_logprobs, flora_references, greedy, greedy_problems, load_reference

from flora_vllm.serving.access import REFUSED
from flora_vllm.serving.server import ServerProcess
from flora_vllm.testing.tiny import (
    LLAMA_TARGETS,
    build_llama,
    make_flora_adapter,
    make_lora_adapter,
    make_tenant_adapters,
)

TENANTS = 256
IN_FLIGHT = 64  # = --max-loras: that many distinct adapters fit one step
CPU_LORAS = 96  # host cache: fewer than TENANTS, so some are read from disk again
MAX_TOKENS = 4
PROMPT = [7, 21, 3, 99, 140, 8, 33, 250, 17, 5, 64, 12]
RSS_MARGIN = 256 * 2**20  # a second pass over every tenant must not grow the server more


@dataclass
class Root:
    server: ServerProcess
    client: OpenAI
    model: str
    tenants: dict[str, str]
    folder: str


def _tenant(i: int) -> str:
    return f"tenant-{i:04d}"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    base = tmp_path_factory.mktemp("resolver")
    model = build_llama(str(base / "model"))
    folder = base / "adapters"
    tenants = make_tenant_adapters(
        model, str(folder), [_tenant(i) for i in range(TENANTS)], LLAMA_TARGETS
    )
    make_lora_adapter(model, str(folder / "lora-t"), 4, LLAMA_TARGETS, 7)
    make_flora_adapter(model, str(folder / "too-big"), 16, LLAMA_TARGETS, 3)  # rank 16 > 8
    make_flora_adapter(model, str(folder / "rank-two"), 2, LLAMA_TARGETS, 5)  # FLoRA rank 2 > 1
    (folder / "notes.txt").write_text("not an adapter")
    os.makedirs(folder / "empty")
    make_flora_adapter(model, str(base / "outside"), 1, LLAMA_TARGETS, 4)
    os.symlink(base / "outside", folder / "escape")
    args = [
        "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "512",
        "--max-loras", str(IN_FLIGHT), "--max-cpu-loras", str(CPU_LORAS),
        "--max-lora-rank", "8", "--max-num-seqs", str(IN_FLIGHT), "--seed", "0",
    ]
    # FLORA_ADAPTER_ROOTS alone, as for the plain `vllm` command: no --lora-modules at all
    # FLoRA slots hold rank 1 (the tenants'), LoRA slots rank 8: FLORA_MAX_RANK
    env = {"HF_HUB_OFFLINE": "1", "FLORA_ADAPTER_ROOTS": str(folder), "FLORA_MAX_RANK": "1"}
    log = str(base / "server.log")
    with ServerProcess(model, args=args, env=env, log_path=log) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="x", timeout=600, max_retries=0)
        yield Root(server, client, model, tenants, str(folder))


def _ask(client: OpenAI, model: str, n: int = MAX_TOKENS) -> list[int]:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


def _server_rss(server: ServerProcess) -> int:
    """Resident memory of the server and its children (engine core), in bytes."""
    import psutil

    proc = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def _listed(root: Root) -> set[str]:
    return {m.id for m in root.client.models.list().data}


def test_every_tenant_resolved_on_first_use_equals_the_dense_reference(root: Root) -> None:
    names = list(root.tenants)
    assert _listed(root) == {"base"}, "nothing is loaded before first use"
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        answers = list(pool.map(lambda n: ask_logprobs(root.client, n, PROMPT, MAX_TOKENS), names))
    refs = flora_references(root.model, [root.tenants[n] for n in names])
    wrong = {n: p for n, (toks, lps), ref in zip(names, answers, refs, strict=True)
             if (p := greedy_problems(ref, PROMPT, toks, lps))}
    assert not wrong, f"{len(wrong)} tenants differ from the dense reference: {wrong}"
    assert len({tuple(t) for t, _ in answers}) > 1, "tenants must not all answer alike"
    assert set(names) <= _listed(root)

    rss = _server_rss(root.server)
    with ThreadPoolExecutor(IN_FLIGHT) as pool:  # again: most come back from disk
        again = list(pool.map(lambda n: ask_logprobs(root.client, n, PROMPT, MAX_TOKENS), names))
    grown = _server_rss(root.server) - rss
    print(f"\nserver RSS {rss / 2**20:.0f} MiB after {TENANTS} tenants, "
          f"second pass {grown / 2**20:+.1f} MiB")
    assert [t for t, _ in again] == [t for t, _ in answers]  # same engine, same numerics
    assert grown < RSS_MARGIN, f"a second pass grew the server by {grown / 2**20:.0f} MiB"


def _in_flight(root: Root) -> tuple[set[str], float]:
    """(adapters with a request in the engine, requests running) from the server's /metrics."""
    text = httpx.get(root.server.url + "/metrics", timeout=60).text
    adapters, running = set(), 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "flora:adapter_requests_in_flight" and s.value > 0:
                adapters.add(s.labels["adapter"])
            if s.name == "vllm:num_requests_running":
                running += s.value
    return adapters, running


def test_sixty_four_distinct_tenants_in_the_engine_at_once(root: Root) -> None:
    """64 streams, each on its own tenant: once every one has its first token and none has its
    last, the server's own gauges must show all 64 adapters running together."""
    names = [_tenant(i) for i in range(TENANTS - IN_FLIGHT, TENANTS)]
    started = threading.Barrier(IN_FLIGHT + 1, timeout=600)
    scraped = threading.Event()
    finished_early: list[str] = []

    def stream(name: str) -> int:
        chunks = root.client.completions.create(
            model=name, prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )
        n = 0
        for chunk in chunks:
            n += 1
            if n == 1:
                started.wait()
            if chunk.choices and chunk.choices[0].finish_reason and not scraped.is_set():
                finished_early.append(name)
        return n

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(stream, n) for n in names]
        started.wait()  # every stream has its first token
        adapters, running = _in_flight(root)
        scraped.set()
        counts = [f.result() for f in futures]
    assert not finished_early, f"finished before the scrape: {finished_early}"
    assert set(names) <= adapters, f"in flight: {len(adapters & set(names))} of {IN_FLIGHT}"
    assert running >= IN_FLIGHT
    assert all(c > 1 for c in counts)


def test_lora_folder_resolved_too(root: Root) -> None:
    ref = load_reference(root.model, os.path.join(root.folder, "lora-t"))
    assert _ask(root.client, "lora-t") == greedy(ref, PROMPT, MAX_TOKENS)


@pytest.mark.parametrize(
    ("name", "error", "says"),
    [
        ("escape", openai.PermissionDeniedError, REFUSED),  # a symlink out of the root
        ("../outside", openai.PermissionDeniedError, REFUSED),  # a sibling of the root
        ("/etc", openai.PermissionDeniedError, REFUSED),
        ("nobody-here", openai.NotFoundError, "does not exist"),
        ("too-big", openai.BadRequestError, "rank 16 > FLORA_MAX_RANK=1"),
        ("rank-two", openai.BadRequestError, "rank 2 > FLORA_MAX_RANK=1"),
        ("empty", openai.BadRequestError, "holds no adapter"),
        ("notes.txt", openai.BadRequestError, "Not a directory"),
    ],
)
def test_refusals_keep_their_status_and_reason(
    root: Root, name: str, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=None) as caught:
        _ask(root.client, name)
    assert says in str(caught.value), str(caught.value)
    with pytest.raises(error):  # refused again the same way: nothing half-loaded stays
        _ask(root.client, name)
    assert name not in _listed(root)
    ref = load_reference(root.model, root.tenants[_tenant(0)])
    assert _ask(root.client, _tenant(0)) == greedy(ref, PROMPT, MAX_TOKENS)  # still serving


def test_explicit_loads_obey_the_root_too(root: Root) -> None:
    r = httpx.post(root.server.url + "/v1/load_lora_adapter", timeout=120,
                   json={"lora_name": "elsewhere", "lora_path": os.path.dirname(root.folder)})
    assert r.status_code == 403, r.text
    assert json.loads(r.text)["error"]["message"].count(REFUSED) == 1
