"""What an operator relies on, against a real vLLM server: per-adapter Prometheus metrics that
match what the clients were told (usage), residency that follows vLLM's slot and cache limits,
`--api-key` on every endpoint, and adapter files only from the allowed roots."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from conftest import serve
from openai import OpenAI, PermissionDeniedError
from prometheus_client.parser import text_string_to_metric_families

from flora_vllm.serving.access import (
    REFUSED,
    AdapterPathRefusedError,
    check_adapter_path,
    find_adapter_folder,
)
from flora_vllm.serving.server import ServerProcess

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(model_sets, tmp_path_factory) -> Iterator[ServerProcess]:
    """LLaMA server with an API key, adapters only from the model set's folder, and fewer
    device slots (2) and host cache entries (3) than adapters, so residency changes."""
    root = os.path.dirname(model_sets["llama"]["base"])
    log = str(tmp_path_factory.mktemp("logs") / "guarded.log")
    # later flag wins over serve()'s; CORS for every origin (vLLM's default up to 0.31, none
    # from 0.32), so the test sees where CORS runs relative to the key check
    extra = ["--api-key", KEY, "--max-cpu-loras", "3", "--allowed-origins", '["*"]']
    with serve(model_sets["llama"], 2, log, extra, env={"FLORA_ADAPTER_ROOTS": root}) as server:
        yield server


def _metrics(server: ServerProcess) -> dict[str, dict[tuple, float]]:
    """Every `flora:` sample of /metrics: name -> {sorted label items: value}."""
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=60).text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("flora:"):
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _value(m: dict, name: str, **labels: str) -> float:
    return m.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def _adapter(name: str) -> dict[str, str]:
    kind = "base" if name == "base" else name.split("-")[0]
    return {"adapter": "" if name == "base" else name, "adapter_type": kind}


def test_api_key_guards_every_endpoint(guarded, model_sets):
    """No key or a wrong key: 401 everywhere (load/unload, /metrics, /tokenize, ...) except
    /health; nothing a refused call asked for happens."""
    c = httpx.Client(base_url=guarded.url, timeout=120)
    path = model_sets["llama"]["flora-r4"]
    calls = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": "flora-r1", "prompt": [5, 6], "max_tokens": 2}),
        ("POST", "/v1/chat/completions",
         {"model": "flora-r1", "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "sneaky", "lora_path": path}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "flora-r1"}),
        ("GET", "/metrics", None),
        ("POST", "/tokenize", {"model": "base", "prompt": "hi"}),
        ("GET", "/version", None),
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, url, body in calls:
            r = c.request(method, url, json=body, headers={**headers, "Origin": "http://app"})
            assert r.status_code == 401, (method, url, headers, r.text)
            # A browser client sees the 401, not a CORS failure (CORS runs outside the key).
            assert r.headers.get("access-control-allow-origin") == "*", (url, r.headers)
    assert c.get("/health").status_code == 200
    served = [m["id"] for m in c.get("/v1/models", headers=AUTH).json()["data"]]
    assert "flora-r1" in served and "sneaky" not in served  # refused unload/load did nothing
    # The OpenAI client with the key works; a wrong key is an AuthenticationError.
    ok = OpenAI(base_url=guarded.url + "/v1", api_key=KEY)
    assert ok.completions.create(model="flora-r1", prompt=[5, 6], max_tokens=2).usage
    with pytest.raises(Exception, match="401"):
        OpenAI(base_url=guarded.url + "/v1", api_key="wrong").models.list()


def test_adapters_only_from_allowed_roots(guarded, model_sets, tmp_path):
    """A folder outside the root, a `..` escape and a symlink out are 403; inside loads."""
    c = httpx.Client(base_url=guarded.url, headers=AUTH, timeout=120)
    good = model_sets["llama"]["flora-r4"]
    root = os.path.dirname(good)
    outside = shutil.copytree(good, tmp_path / "outside")
    link = os.path.join(root, f"link-{os.getpid()}")
    os.symlink(outside, link)
    try:
        for path in (str(outside), os.path.join(root, "..", "..", tmp_path.name, "outside"), link,
                     "someorg/some-adapter"):
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "esc", "lora_path": path})
            assert r.status_code == 403, (path, r.text)
            assert REFUSED in r.json()["error"]["message"]
        client = OpenAI(base_url=guarded.url + "/v1", api_key=KEY)
        with pytest.raises(PermissionDeniedError):
            client.post("/load_lora_adapter", body={"lora_name": "esc", "lora_path": link},
                        cast_to=str)
    finally:
        os.unlink(link)
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "inside", "lora_path": good})
    assert r.status_code == 200, r.text
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "inside"}).status_code == 200


def test_check_adapter_path_rules(tmp_path):
    """The pure check: no roots allows anything; with roots, only real paths inside."""
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "ok").mkdir(parents=True)
    other.mkdir()
    (other / "secret.safetensors").write_bytes(b"x")
    (root / "ok" / "w.safetensors").write_bytes(b"x")
    roots = [os.path.realpath(root)]
    check_adapter_path(str(other), [])
    check_adapter_path(str(root / "ok"), roots)
    check_adapter_path(str(root / "missing"), roots)  # inside: the loader says 404
    (root / "bad").mkdir()
    os.symlink(other / "secret.safetensors", root / "bad" / "adapter_model.safetensors")
    os.symlink(other, root / "dirlink")
    for path in (str(other), f"{root}/ok/../../other", str(root / "bad"), str(root / "dirlink"),
                 "org/name", "s3://bucket/a", "", f"{root}-sibling"):
        with pytest.raises(AdapterPathRefusedError, match=REFUSED):
            check_adapter_path(path, roots)
    with pytest.raises(ValueError, match="null byte"):
        check_adapter_path(f"{root}/ok\x00", roots)


def test_find_adapter_folder_rules(tmp_path):
    """`<root>/<name>` from the first root holding it; names leading outside are refused even
    where nothing is there; a missing name is None (the server's 404)."""
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    for d in (a / "x", b / "x", b / "y", other / "z"):
        d.mkdir(parents=True)
    os.symlink(other, a / "link")
    roots = [os.path.realpath(a), os.path.realpath(b)]
    assert find_adapter_folder("x", roots) == os.path.join(roots[0], "x")
    assert find_adapter_folder("y", roots) == os.path.join(roots[1], "y")
    assert find_adapter_folder("nobody", roots) is None
    assert find_adapter_folder("nobody", []) is None
    for name in ("link", "../other", "../other/z", "../nowhere", str(other), "/nowhere"):
        with pytest.raises(AdapterPathRefusedError, match=REFUSED):
            find_adapter_folder(name, roots)
    with pytest.raises(ValueError, match="null byte"):
        find_adapter_folder("x\x00", roots)


@pytest.mark.parametrize(("runtime", "registered"), [(None, True), ("1", True), ("0", False)])
def test_resolver_registered_with_roots_only(tmp_path, monkeypatch, runtime, registered):
    """The plugin registers the roots resolver in vLLM's registry when roots are set, turning
    runtime loading on unless it was switched off explicitly."""
    from vllm.lora.resolver import LoRAResolverRegistry

    from flora_vllm.config import get_config
    from flora_vllm.serving import resolver

    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    for env in ("FLORA_ADAPTER_ROOTS", resolver.RUNTIME_ENV):
        monkeypatch.delenv(env, raising=False)
    get_config.cache_clear()
    try:
        assert resolver.register_resolver() is None  # no roots: nothing
        monkeypatch.setenv("FLORA_ADAPTER_ROOTS", str(tmp_path))
        if runtime is not None:
            monkeypatch.setenv(resolver.RUNTIME_ENV, runtime)
        get_config.cache_clear()
        got = resolver.register_resolver()
        assert (got is not None) == registered
        assert (resolver.NAME in LoRAResolverRegistry.get_supported_resolvers()) == registered
        assert os.environ[resolver.RUNTIME_ENV] == (runtime or "1")
    finally:
        get_config.cache_clear()


def _complete(client: OpenAI, model: str, n_prompt: int, max_tokens: int):
    prompt = [7 + (i * 13) % 400 for i in range(n_prompt)]
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, extra_body={"ignore_eos": True})


def test_per_adapter_metrics_match_usage(guarded):
    """Requests, prompt and generated tokens per adapter on /metrics equal the sums of the
    `usage` the clients got back; latency histograms count every request."""
    client = OpenAI(base_url=guarded.url + "/v1", api_key=KEY, timeout=300)
    before = _metrics(guarded)
    plan = [("flora-r1", 9, 3), ("flora-r1", 17, 5), ("flora-r1", 4, 2), ("flora-r2", 12, 4),
            ("flora-r2", 30, 1), ("lora-r8", 8, 6), ("base", 5, 3), ("base", 21, 2)]
    sent: Counter = Counter()
    prompt: Counter = Counter()
    generated: Counter = Counter()
    for model, n_prompt, max_tokens in plan:
        usage = _complete(client, model, n_prompt, max_tokens).usage
        sent[model] += 1
        prompt[model] += usage.prompt_tokens
        generated[model] += usage.completion_tokens
    # One streamed chat request counts the same way (its usage comes in the last chunk).
    stream = client.chat.completions.create(
        model="flora-r2", messages=[{"role": "user", "content": "def add(a, b):"}],
        max_tokens=4, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    usage = [chunk.usage for chunk in stream if chunk.usage][-1]
    sent["flora-r2"] += 1
    prompt["flora-r2"] += usage.prompt_tokens
    generated["flora-r2"] += usage.completion_tokens

    after = _metrics(guarded)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    for model in sent:
        lab = _adapter(model)
        assert delta("flora:adapter_requests_total", **lab, finished_reason="length") == sent[model]
        assert delta("flora:adapter_prompt_tokens_total", **lab) == prompt[model], model
        assert delta("flora:adapter_generation_tokens_total", **lab) == generated[model], model
        assert delta("flora:adapter_e2e_request_latency_seconds_count", **lab) == sent[model]
        assert delta("flora:adapter_time_to_first_token_seconds_count", **lab) == sent[model]
        assert delta("flora:adapter_e2e_request_latency_seconds_sum", **lab) > 0
    assert delta("flora:adapter_requests_total", **_adapter("flora-r4"),
                 finished_reason="length") == 0


def test_unloaded_adapters_leave_no_series(guarded, model_sets):
    """An adapter's per-adapter series go when it is unloaded and its last request is done
    (hundreds of short-lived tenants must not grow /metrics forever); a name loaded again
    starts from zero."""
    client = OpenAI(base_url=guarded.url + "/v1", api_key=KEY, timeout=300)
    c = httpx.Client(base_url=guarded.url, headers=AUTH, timeout=120)
    path = model_sets["llama"]["flora-r1"]
    lab = {"adapter": "short-lived", "adapter_type": "flora"}
    for _ in range(2):
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "short-lived", "lora_path": path})
        assert r.status_code == 200, r.text
        _complete(client, "short-lived", 5, 2)
        m = _metrics(guarded)
        assert _value(m, "flora:adapter_requests_total", **lab, finished_reason="length") == 1
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "short-lived"}).is_success
        deadline = time.monotonic() + 60  # released when its last request's lease is gone
        while time.monotonic() < deadline:
            left = [(n, k) for n, v in _metrics(guarded).items() for k in v
                    if ("adapter", "short-lived") in k]
            if not left:
                break
            time.sleep(0.5)
        assert not left, left
    m = _metrics(guarded)  # the others keep theirs
    assert _value(m, "flora:adapter_requests_total", **_adapter("flora-r1"),
                  finished_reason="length") > 0


def test_residency_follows_slots_and_cache(guarded):
    """With 2 device slots and 3 host cache entries, the two adapters used last are on the
    device, at most 3 adapters are held at all, and each is in one place only."""
    client = OpenAI(base_url=guarded.url + "/v1", api_key=KEY, timeout=300)
    for model in ("flora-r8", "lora-r8", "flora-r4", "flora-r2", "flora-r1"):  # one at a time
        _complete(client, model, 6, 1)
    m = _metrics(guarded)
    served = ("flora-r1", "flora-r2", "flora-r4", "flora-r8", "lora-r8")
    where = {
        a: {loc for loc in ("device", "host")
            if _value(m, "flora:adapter_resident", **_adapter(a), location=loc) == 1.0}
        for a in served
    }
    assert all(len(v) <= 1 for v in where.values()), where
    assert {a for a, v in where.items() if v == {"device"}} == {"flora-r1", "flora-r2"}, where
    assert sum(1 for v in where.values() if v) <= 3, where
    assert where["flora-r8"] == set(), where  # used first: evicted from both since
    for a in served:  # every served adapter has both series, so "absent" means "not held"
        for loc in ("device", "host"):
            assert (("adapter", a), ("adapter_type", a.split("-")[0]), ("location", loc)) in m[
                "flora:adapter_resident"]


def test_in_flight_and_aborted_requests(guarded):
    """A long request shows in the in-flight gauge while it runs; a client that hangs up
    mid-stream is counted with finished_reason="abort"."""
    client = OpenAI(base_url=guarded.url + "/v1", api_key=KEY, timeout=300)
    lab = _adapter("flora-r4")
    worker = threading.Thread(target=_complete, args=(client, "flora-r4", 8, 400))
    worker.start()
    seen = 0.0
    while worker.is_alive() and not seen:
        seen = _value(_metrics(guarded), "flora:adapter_requests_in_flight", **lab)
        time.sleep(0.05)
    worker.join()
    assert seen >= 1, "the running request never showed in flora:adapter_requests_in_flight"
    assert _value(_metrics(guarded), "flora:adapter_requests_in_flight", **lab) == 0

    aborted = _value(_metrics(guarded), "flora:adapter_requests_total", **lab,
                     finished_reason="abort")
    body = {"model": "flora-r4", "prompt": [9, 8, 7], "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", guarded.url + "/v1/completions", json=body, headers=AUTH,
                      timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # first chunk arrived: the request runs; now hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _value(_metrics(guarded), "flora:adapter_requests_total", **lab,
                     finished_reason="abort")
        if now == aborted + 1:
            break
        time.sleep(0.2)
    assert now == aborted + 1, "the hung-up request was not counted as aborted"
