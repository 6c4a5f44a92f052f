"""Bad adapters and bad requests get a clear error with the right HTTP status, and the server
keeps serving everyone else (checked after every case with a known-good FLoRA request).

Tables, each row (case id, what to send, expected status, a fragment of the message):
ADAPTER_CASES (broken folders sent to /v1/load_lora_adapter; builders in tests/malformed.py),
REQUEST_CASES (broken bodies for the completion, chat and load/unload endpoints) and PATH_CASES
(adapter paths a server with FLORA_ADAPTER_ROOTS must refuse, on a second server). ACCEPTED
holds odd-looking adapters that are valid, so the checks cannot drift into refusing them.
A row the server gets wrong goes in the *_XFAIL dicts (xfail(strict=True), with what the
server does instead), so a fix shows up as an XPASS; they are empty now. Order matters: the
final health check runs after every case, and the request that used to kill vLLM 0.29's engine
(prompt_logprobs with LoRA on) runs after that.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import httpx
import pytest
import torch
from conftest import ADAPTERS, serve
from malformed import (
    CONFIG,
    LORA_WEIGHTS,
    WEIGHTS,
    A,
    B,
    Src,
    add,
    all_to,
    cfg,
    cfg_without,
    config_text,
    copy,
    deep_json,
    dora,
    drop,
    edit_config,
    edit_tensors,
    empty_folder,
    entry,
    fifo_instead_of,
    file_not_folder,
    first_magnitude,
    first_vector,
    flora,
    folder_instead_of,
    header,
    ia3,
    link_in,
    lora,
    lora_claiming,
    many_files,
    nested,
    overlap,
    poke,
    raw_safetensors,
    remove,
    scaled,
    set_factor,
    set_tensor,
    symlink,
    symlink_chain,
    symlink_loop,
    tensors,
    then,
    up_and_out,
    weights_bytes,
    write,
)

from flora_vllm.testing.tiny import LLAMA_TARGETS, make_flora_adapter

REFUSED = "outside the allowed adapter roots"  # the 403 message of the allowed-roots check
NOT_FOUND = "No adapter found"
INVALID = "Invalid adapter"
NOT_SAFETENSORS = "not a readable safetensors"
# No peft_type means PEFT LoRA (the PEFT convention): vLLM's own config check answers.
MISSING_FIELDS = "Missing required configuration fields"
TARGETS = list(LLAMA_TARGETS)


class AdapterCase(NamedTuple):
    """A broken adapter: `build(src)` makes it and returns the path to load."""

    id: str
    build: Callable[[Src], str]
    status: int
    message: str


ADAPTER_CASES: list[AdapterCase] = [
    # -- the folder -------------------------------------------------------------------------
    AdapterCase("missing-folder", lambda s: s.tmp, 404, NOT_FOUND),
    AdapterCase("empty-folder", empty_folder, 404, NOT_FOUND),
    AdapterCase("path-is-a-file", file_not_folder, 400, "Not a directory"),
    AdapterCase("no-config", lambda s: remove(flora(s), CONFIG), 404, NOT_FOUND),
    AdapterCase("config-is-a-folder", folder_instead_of(CONFIG), 400, "Is a directory"),
    AdapterCase("no-weights", lambda s: remove(flora(s), WEIGHTS), 400, "missing weights file"),
    AdapterCase("weights-is-a-folder", folder_instead_of(WEIGHTS), 400, "missing weights file"),
    # -- the safetensors file ---------------------------------------------------------------
    AdapterCase("empty-weights", weights_bytes(b""), 400, NOT_SAFETENSORS),
    AdapterCase("corrupt-weights", weights_bytes(b"\x00garbage" * 50), 400, NOT_SAFETENSORS),
    AdapterCase("truncated-weights", weights_bytes(lambda good: good[:5000]), 400,
                NOT_SAFETENSORS),
    AdapterCase("header-longer-than-file", weights_bytes(
        raw_safetensors(b'{"a": 1}', length=10**6)), 400, NOT_SAFETENSORS),
    AdapterCase("header-size-huge", weights_bytes(struct.pack("<Q", 2**63) + b"{}"), 400,
                NOT_SAFETENSORS),
    AdapterCase("header-not-json", weights_bytes(raw_safetensors(b"{this is not json}")), 400,
                NOT_SAFETENSORS),
    AdapterCase("header-is-array", weights_bytes(raw_safetensors(b"[1, 2, 3]")), 400,
                NOT_SAFETENSORS),
    AdapterCase("header-wrong-dtype", header(entry(A, dtype="F16")), 400, NOT_SAFETENSORS),
    AdapterCase("header-unknown-dtype", header(entry(A, dtype="Q4")), 400, NOT_SAFETENSORS),
    AdapterCase("header-negative-shape", header(entry(A, shape=[-2, 512])), 400,
                NOT_SAFETENSORS),
    AdapterCase("header-offsets-past-end", header(entry(B, data_offsets=[0, 10**9])), 400,
                NOT_SAFETENSORS),
    AdapterCase("header-overlapping-offsets", header(overlap), 400, NOT_SAFETENSORS),
    AdapterCase("trailing-bytes", weights_bytes(lambda good: good + b"\x00" * 64), 400,
                NOT_SAFETENSORS),
    # -- adapter_config.json ----------------------------------------------------------------
    AdapterCase("bad-json", config_text(b"{not json"), 400, "JSONDecodeError"),
    AdapterCase("config-not-utf8", config_text(b"\xff\xfe{\x00}"), 400, "UnicodeDecodeError"),
    AdapterCase("config-deeply-nested", config_text(deep_json(100_000)), 400, INVALID),
    AdapterCase("config-is-array", config_text(json.dumps(["FLORA", 2])), 400, INVALID),
    AdapterCase("config-empty-object", config_text("{}"), 400, MISSING_FIELDS),
    AdapterCase("no-peft-type", cfg_without("peft_type"), 400, MISSING_FIELDS),
    AdapterCase("null-peft-type", cfg(peft_type=None), 400, MISSING_FIELDS),
    AdapterCase("unknown-peft-type", cfg(peft_type="LOHA"), 400, "unknown peft_type 'LOHA'"),
    AdapterCase("flora-files-called-ia3", cfg(peft_type="IA3"), 400,
                "missing adapter_model.safetensors"),
    # -- PEFT IA3 folders (served as rank-1 FLoRA) -----------------------------------------
    AdapterCase("ia3-wrong-length", ia3(first_vector(lambda v: torch.ones(1, v.shape[1] + 3))),
                400, "expected"),
    AdapterCase("ia3-nan", ia3(first_vector(lambda v: v * float("nan"))), 400, "holds NaN"),
    AdapterCase("ia3-missing-vector", ia3(first_vector(lambda v: None)), 400,
                "is targeted but its ia3_l vector is missing"),
    AdapterCase("ia3-on-embeddings", ia3(lambda t: {
        **t, "base_model.model.model.embed_tokens.ia3_l": torch.ones(1, 8)}), 400,
        "IA3 on module 'model.embed_tokens' is not served"),
    AdapterCase("ia3-modules-to-save", ia3(modules_to_save=["lm_head"]), 400, "modules_to_save"),
    # -- PEFT DoRA folders (LoRA with use_dora: a LoRA plus rank-1 output scalings) -----------
    AdapterCase("dora-wrong-length",
                dora(first_magnitude(lambda v: torch.ones(v.shape[0] + 3))), 400, "expected"),
    AdapterCase("dora-nan", dora(first_magnitude(lambda v: v * float("nan"))), 400, "holds NaN"),
    AdapterCase("dora-missing-magnitude", dora(first_magnitude(lambda v: None)), 400,
                "its lora_magnitude_vector is missing"),
    AdapterCase("dora-on-embeddings", dora(lambda t: {
        **t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(8, 16),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.ones(16, 8),
        "base_model.model.model.embed_tokens.lora_magnitude_vector": torch.ones(16)}), 400,
        "DoRA on embeddings ('model.embed_tokens') is not served"),
    AdapterCase("dora-fan-in-fan-out", dora(fan_in_fan_out=True), 400, "fan_in_fan_out"),
    AdapterCase("prefix-tuning", cfg(peft_type="PREFIX_TUNING"), 400,
                "unknown peft_type 'PREFIX_TUNING'"),
    AdapterCase("lowercase-peft-type", cfg(peft_type="flora"), 400, "unknown peft_type 'flora'"),
    AdapterCase("numeric-peft-type", cfg(peft_type=7), 400, "unknown peft_type 7"),
    AdapterCase("no-rank", cfg_without("r"), 400, "`r` must be a positive integer, got None"),
    AdapterCase("zero-rank", cfg(r=0), 400, "`r` must be a positive integer, got 0"),
    AdapterCase("negative-rank", cfg(r=-2), 400, "positive integer"),
    AdapterCase("rank-as-string", cfg(r="2"), 400, "positive integer, got '2'"),
    AdapterCase("rank-as-float", cfg(r=2.0), 400, "positive integer, got 2.0"),
    AdapterCase("rank-as-bool", cfg(r=True), 400, "positive integer, got True"),
    AdapterCase("rank-over-limit", cfg(r=16), 400, "--max-lora-rank 8"),
    AdapterCase("huge-rank", cfg(r=10**9), 400, "--max-lora-rank"),
    AdapterCase("rank-beyond-int64", cfg(r=2**70), 400, "--max-lora-rank"),
    AdapterCase("nan-alpha", config_text(json.dumps(
        {"peft_type": "FLORA", "r": 2, "flora_alpha": float("nan"),
         "target_modules": TARGETS})), 400, "flora_alpha"),
    AdapterCase("inf-alpha", cfg(flora_alpha=float("inf")), 400, "`flora_alpha` must be"),
    AdapterCase("zero-alpha", cfg(flora_alpha=0), 400, "`flora_alpha` must be"),
    AdapterCase("alpha-as-string", cfg(flora_alpha="1.0"), 400, "`flora_alpha` must be"),
    AdapterCase("no-targets", cfg_without("target_modules"), 400,
                "`target_modules` must be a non-empty list"),
    AdapterCase("empty-targets", cfg(target_modules=[]), 400,
                "`target_modules` must be a non-empty list"),
    AdapterCase("non-string-target", cfg(target_modules=["q_proj", 3]), 400,
                "`target_modules` must be a non-empty list"),
    AdapterCase("targets-as-one-string", cfg(target_modules="q_proj"), 400,
                "has weights but is not in target_modules"),
    AdapterCase("unknown-target", cfg(target_modules=[*TARGETS, "attn_proj"]), 400,
                "'attn_proj'"),
    AdapterCase("base-model-not-string", cfg(base_model_name_or_path=["m"]), 400,
                "`base_model_name_or_path` must be a string"),
    # -- the tensors ------------------------------------------------------------------------
    AdapterCase("nan-values", tensors(poke(A, float("nan"))), 400, "NaN or inf"),
    AdapterCase("inf-values", tensors(poke(B, float("inf"))), 400, "NaN or inf"),
    AdapterCase("float64-overflows-float32",
                tensors(then(all_to(torch.float64), poke(A, 1e300))), 400, "overflow"),
    AdapterCase("scale-overflows-float32", lambda s: edit_tensors(
        edit_config(flora(s), flora_alpha=8.0), poke(B, 3e38)), 400, "once scaled"),
    AdapterCase("merged-factor-overflows", tensors(scaled(1e20)), 400, "merged factor"),
    AdapterCase("wrong-shape", set_factor(A, lambda x: torch.ones(x.shape[0], x.shape[1] + 3)), 400,
                "has shape"),
    AdapterCase("transposed-factor", set_factor(A, lambda x: x.t()), 400, "has shape"),
    AdapterCase("one-dim-factor", set_factor(A, lambda x: x.reshape(-1)), 400, "has shape"),
    AdapterCase("three-dim-factor", set_factor(B, lambda x: x.unsqueeze(0)), 400, "has shape"),
    AdapterCase("zero-size-factor", set_factor(A, lambda x: x[:0]), 400, "has shape"),
    AdapterCase("rank-differs-from-config", cfg(r=4), 400, "(r=4)"),
    AdapterCase("int-dtype", set_factor(B, lambda x: x.to(torch.int32)), 400, "float type"),
    AdapterCase("bool-dtype", set_factor(A, lambda x: x > 1), 400, "dtype torch.bool"),
    AdapterCase("missing-factor", tensors(drop(B)), 400, "is missing"),
    AdapterCase("no-tensors", tensors(lambda t: t.clear()), 400, "is missing"),
    AdapterCase("module-not-targeted", cfg(target_modules=[t for t in TARGETS if t != "o_proj"]),
                400, "has weights but is not in target_modules"),
    AdapterCase("module-model-lacks", tensors(add(
        "base_model.model.model.layers.9.mlp.up_proj.flora_A.weight", torch.ones(2, 256))), 400,
        "not an adaptable linear module"),
    AdapterCase("stray-tensor", tensors(add("something.else", torch.ones(2))), 400,
                "unexpected tensor"),
    # -- PEFT LoRA adapters (vLLM's own loader behind ours) ---------------------------------
    AdapterCase("lora-rank-over-limit", lambda s: edit_config(lora(s), r=16), 400,
                "max_lora_rank"),
    AdapterCase("lora-corrupt-weights", lambda s: write(lora(s), LORA_WEIGHTS, b"\x00" * 99), 400,
                "not a readable safetensors file"),
    AdapterCase("lora-wrong-shape", tensors(set_tensor(
        "lora_A.weight", lambda x: torch.ones(x.shape[0], x.shape[1] + 5)), lora), 400, INVALID),
    AdapterCase("lora-unknown-module", tensors(add(
        "base_model.model.model.layers.0.self_attn.attn_proj.lora_A.weight", torch.ones(8, 256)),
        lora), 400, "attn_proj"),
    AdapterCase("lora-nan-values", tensors(poke("lora_B.weight", float("nan")), lora), 400,
                "NaN or inf"),
    AdapterCase("lora-rank-as-string", lambda s: edit_config(lora(s), r="8"), 400, INVALID),
    AdapterCase("lora-missing-B", tensors(drop("lora_B.weight"), lora), 400, "but no lora_B"),
    AdapterCase("lora-narrower-than-layer", tensors(set_tensor(
        "lora_A.weight", lambda x: x[:, :100]), lora), 400, "has shape [8, 100], expected [r, "),
    AdapterCase("lora-claims-5-gib", lora_claiming(5 * 2**30), 400, "FLORA_MAX_ADAPTER_MB"),
    AdapterCase("lora-claims-past-its-end", lambda s: write(lora(s), LORA_WEIGHTS, raw_safetensors(
        b'{"x": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}')), 400,
        "past the end of the file"),
    AdapterCase("lora-config-is-array", lambda s: write(lora(s), CONFIG, "[1, 2]"), 400,
                "must hold a JSON object, got a JSON list"),
    # -- files that are not files: opening one blocks (before: the engine step, every tenant) -
    AdapterCase("config-is-fifo", fifo_instead_of(CONFIG), 400, "named pipe (FIFO)"),
    AdapterCase("weights-is-fifo", fifo_instead_of(WEIGHTS), 400, "named pipe (FIFO)"),
    AdapterCase("lora-config-is-fifo", fifo_instead_of(CONFIG, lora), 400, "named pipe (FIFO)"),
    AdapterCase("lora-weights-is-fifo", fifo_instead_of(LORA_WEIGHTS, lora), 400,
                "named pipe (FIFO)"),
    AdapterCase("nested-40-deep", nested(40), 400, "nests folders more than 8 deep"),
    AdapterCase("lora-nested-40-deep", nested(40, lora), 400, "more than 8 deep"),
    AdapterCase("5000-files", many_files(5000), 400, "holds more than 1000 entries"),
    AdapterCase("symlink-loop", symlink_loop, 400, "more than 8 deep"),
    AdapterCase("broken-symlink", lambda s: symlink("/nonexistent", os.path.join(flora(s), "x"))
                and s.tmp, 400, "broken symlink"),
    # -- the path, on a server without allowed roots (anything local goes; no hub here) -----
    AdapterCase("nul-byte-in-path", lambda s: s.flora + "\x00x", 400, "embedded null byte"),
    AdapterCase("hub-id-offline", lambda s: "someorg/some-adapter", 404, NOT_FOUND),
    AdapterCase("path-too-long", lambda s: os.path.join(s.tmp, "a" * 5000), 400,
                "File name too long"),
]

# Rows the server gets wrong today (found by these tests); the reason says what it does instead.
ADAPTER_XFAIL: dict[str, str] = {
}


def _params(cases: list, xfail: dict[str, str], unpack: bool = True) -> list:
    """pytest params of table rows (id first), xfail(strict) where `xfail` names the row."""
    return [
        pytest.param(*(c if unpack else (c,)), id=c[0],
                     marks=[pytest.mark.xfail(strict=True, reason=xfail[c[0]])]
                     if c[0] in xfail else [])
        for c in cases
    ]


def _good_answer(url: str) -> dict:
    """A reference answer of a FLoRA adapter, to check a server still serves correctly."""
    client = httpx.Client(base_url=url, timeout=300)
    body = {"model": "flora-r2", "prompt": [11, 22, 33, 44, 55], "max_tokens": 6,
            "temperature": 0, "logprobs": 1, "return_tokens_as_token_ids": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return {"client": client, "body": body, "answer": r.json()["choices"][0]["logprobs"]}


@pytest.fixture(scope="module")
def good(llama_server, model_sets) -> dict:
    """The main server (no allowed roots) and its reference answer."""
    return _good_answer(llama_server.url)


def _still_serving(good: dict) -> None:
    r = good["client"].post("/v1/completions", json=good["body"])
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == good["answer"]["tokens"]
    assert lp["token_logprobs"] == pytest.approx(good["answer"]["token_logprobs"], abs=1e-5)


def _error(r: httpx.Response) -> str:
    """The message of a vLLM error response ({"error": {"message", "type", "code"}})."""
    return r.json()["error"]["message"]


def _load_refused(
    good: dict, name: str, path: str, status: int, message: str, then: int = 404
) -> None:
    """Loading `path` as `name` answers `status` with `message`, and registers nothing: using
    the name next is `then` (404, like any unknown model; on a server with adapter roots, a
    folder of that name in a root is resolved, and refused again with its own status)."""
    c = good["client"]
    r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    if r.status_code == 200:  # wrongly accepted: unload it so the rows after it are unaffected
        c.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert r.status_code == status, r.text
    assert message in _error(r), r.text
    r = c.post("/v1/completions", json={**good["body"], "model": name})
    assert r.status_code == then, r.text
    assert name not in {m["id"] for m in c.get("/v1/models").json()["data"]}


def _src(model_sets: dict, tmp: str, outside: str = "") -> Src:
    paths = model_sets["llama"]
    return Src(tmp, paths["flora-r2"], paths["lora-r8"], outside)


@pytest.mark.parametrize(("case", "build", "status", "message"),
                         _params(ADAPTER_CASES, ADAPTER_XFAIL))
def test_bad_adapter_is_refused(case, build, status, message, good, model_sets, tmp_path):
    """Each broken adapter: the expected status and reason, nothing registered, and the server
    still answers a good FLoRA request exactly as before."""
    path = build(_src(model_sets, str(tmp_path / case)))
    _load_refused(good, case, path, status, message)
    _still_serving(good)


def test_fifo_in_an_adapter_never_holds_other_tenants(good, model_sets, tmp_path):
    """A folder whose config is a named pipe: the worker used to block opening it, inside the
    engine step, and no request of any tenant was answered (`/health` stayed 200). Now the load
    is refused at once, and a request sent at the same moment is answered, exactly."""
    path = fifo_instead_of(CONFIG)(_src(model_sets, str(tmp_path / "fifo")))
    c, started = good["client"], time.monotonic()
    try:
        with ThreadPoolExecutor(2) as pool:
            load = pool.submit(c.post, LOAD, json={"lora_name": "fifo", "lora_path": path})
            other = pool.submit(c.post, COMPLETIONS, json=good["body"])
            answered = other.result(timeout=120)
            refused = load.result(timeout=120)
    finally:  # were a reader blocked on the pipe, a writer that closes at once releases it
        fd = _open_fifo_writer(os.path.join(path, CONFIG))
        if fd is not None:
            os.close(fd)
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["logprobs"]["tokens"] == good["answer"]["tokens"]
    assert refused.status_code == 400 and "named pipe (FIFO)" in _error(refused), refused.text
    assert time.monotonic() - started < 60  # a liveness bound (blocked before), not a speed
    _still_serving(good)


SLOW_READ_S, READ_TIMEOUT_S = 8.0, 5.0  # the llama_server's test seam and timeout (conftest)


def test_slow_disk_never_holds_other_tenants(good, model_sets, tmp_path, llama_server):
    """A folder on a disk that does not answer in time (test seam: `slow-*` folders read 8 s
    late; the server waits 5 s): the load is a 503 naming the timeout, answered at the
    timeout, not when the disk answers; requests of other tenants sent meanwhile are answered,
    exactly; nothing is registered, and the late copy does not stay on disk."""
    import shutil

    from flora_vllm.config import FLoRAConfig

    path = str(tmp_path / "slow-flora")
    shutil.copytree(model_sets["llama"]["flora-r2"], path)
    c, started = good["client"], time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        load = pool.submit(c.post, LOAD, json={"lora_name": "slow-flora", "lora_path": path})
        others = [c.post(COMPLETIONS, json=good["body"]) for _ in range(3)]
        others_done = time.monotonic() - started
        refused = load.result(timeout=120)
        refused_at = time.monotonic() - started
    for answered in others:
        assert answered.status_code == 200, answered.text
        assert answered.json()["choices"][0]["logprobs"]["tokens"] == good["answer"]["tokens"]
    assert others_done < READ_TIMEOUT_S  # answered while the load waited on the disk
    assert refused.status_code == 503, refused.text
    assert "was not read within 5 s (FLORA_ADAPTER_READ_TIMEOUT_S)" in _error(refused)
    assert READ_TIMEOUT_S <= refused_at < SLOW_READ_S  # the timeout, not the disk, answered
    assert "slow-flora" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
    # The slow read finishes at 8 s; its copy is removed then (the server logs it).
    folder = next(
        os.path.join(root, d) for root in [FLoRAConfig.from_env().snapshot_root()]
        for d in os.listdir(root) if d.startswith(f"server-{llama_server.proc.pid}-")
    )
    late = re.compile(r"adapter read that timed out finished; copy (\S+) removed")
    deadline, found = time.monotonic() + 60, None
    while found is None and time.monotonic() < deadline:
        found = late.search(open(llama_server.log_path, errors="replace").read())
        time.sleep(0.2)  # polls the server's log for the event; the server itself waits on none
    assert found is not None and os.path.dirname(found.group(1)) == folder
    deadline = time.monotonic() + 30  # removal runs in the server's reader pool
    while os.path.exists(found.group(1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(found.group(1))
    _still_serving(good)


def test_huge_adapter_is_refused_without_reading_it(good, model_sets, tmp_path, llama_server):
    """A LoRA file of 5 GiB (sparse: no disk used) whose header declares one 5 GiB tensor: a
    400 naming FLORA_MAX_ADAPTER_MB within seconds, and no process of the server grows (vLLM's
    loader used to read it all: +5.6 GiB RSS)."""
    import psutil

    procs = [psutil.Process(llama_server.proc.pid)]
    procs += procs[0].children(recursive=True)
    rss = lambda: sum(p.memory_info().rss for p in procs if p.is_running())  # noqa: E731
    path = lora_claiming(5 * 2**30)(_src(model_sets, str(tmp_path / "huge")))
    before, started = rss(), time.monotonic()
    _load_refused(good, "huge-lora", path, 400, "FLORA_MAX_ADAPTER_MB")
    took, grown = time.monotonic() - started, rss() - before
    print(f"refused in {took:.2f} s, server RSS {before / 2**20:.0f} MiB {grown / 2**20:+.1f} MiB")
    assert took < 30 and grown < 256 * 2**20
    _still_serving(good)


def _open_fifo_writer(path: str) -> int | None:
    """A non-blocking writer on a FIFO, or None when no reader has it open."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


# --- requests --------------------------------------------------------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
CHAT_BODY = {"model": "flora-r2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
JSON = {"Content-Type": "application/json"}


class RequestCase(NamedTuple):
    """A broken request: `body` (a dict) is merged into the endpoint's good body, keys in
    `drop` removed; bytes are sent as they are (as application/json unless `plain`)."""

    id: str
    endpoint: str
    body: dict | bytes
    status: int
    message: str | re.Pattern  # a part of the error message, or a pattern it must contain
    drop: tuple[str, ...] = ()
    plain: bool = False


def field(name: str) -> re.Pattern:
    """A validation error naming the request field `name`: `'name'` (vLLM 0.29) or the end of
    its location `'body.<...>.name'` (vLLM 0.32)."""
    return re.compile(rf"'{name}'|\.{name}'")


REQUEST_CASES: list[RequestCase] = [
    # -- the body ---------------------------------------------------------------------------
    RequestCase("body-not-json", COMPLETIONS, b"{not json", 400, "JSON decode error"),
    RequestCase("body-empty", COMPLETIONS, b"", 400, "Field required"),
    RequestCase("body-is-array", COMPLETIONS, b"[1, 2]", 400, "valid dictionary"),
    RequestCase("body-not-utf8", COMPLETIONS, b"\xff\xfe", 400, "JSON decode error"),
    RequestCase("body-not-declared-json", COMPLETIONS,
                json.dumps({"model": "flora-r2", "prompt": [5], "max_tokens": 1}).encode(), 400,
                "Only 'application/json' is allowed", plain=True),
    # -- completions ------------------------------------------------------------------------
    RequestCase("unknown-adapter", COMPLETIONS, {"model": "no-such-adapter"}, 404,
                "The model `no-such-adapter` does not exist"),
    RequestCase("model-not-string", COMPLETIONS, {"model": 5}, 400, "valid string"),
    RequestCase("negative-max-tokens", COMPLETIONS, {"max_tokens": -5}, 400, "max_tokens"),
    RequestCase("zero-max-tokens", COMPLETIONS, {"max_tokens": 0}, 400,
                "max_tokens must be at least 1"),
    RequestCase("max-tokens-over-context", COMPLETIONS, {"max_tokens": 10_000}, 400,
                "cannot be greater than max_model_len"),
    RequestCase("prompt-over-context", COMPLETIONS, {"prompt": [7] * 600}, 400,
                "maximum context length is 512"),
    RequestCase("token-id-out-of-vocab", COMPLETIONS, {"prompt": [1, 2, 10**7]}, 400,
                "out of vocabulary"),
    RequestCase("negative-token-id", COMPLETIONS, {"prompt": [-1, 2]}, 400,
                "greater than or equal to 0"),
    RequestCase("empty-prompt-list", COMPLETIONS, {"prompt": []}, 400, "at least one prompt"),
    RequestCase("empty-prompt-string", COMPLETIONS, {"prompt": ""}, 400, "non-empty"),
    RequestCase("wrong-prompt-type", COMPLETIONS, {"prompt": {"a": 1}}, 400, field("prompt")),
    RequestCase("temperature-not-number", COMPLETIONS, {"temperature": "hot"}, 400,
                field("temperature")),
    RequestCase("negative-temperature", COMPLETIONS, {"temperature": -1}, 400,
                "temperature must be non-negative"),
    RequestCase("top-p-over-one", COMPLETIONS, {"top_p": 2}, 400, "top_p must be in (0, 1]"),
    RequestCase("negative-top-k", COMPLETIONS, {"top_k": -5}, 400, "top_k must be"),
    RequestCase("n-zero", COMPLETIONS, {"n": 0}, 400, "n must be at least 1"),
    RequestCase("n-huge", COMPLETIONS, {"n": 10**6, "temperature": 1}, 400, "n must be at most"),
    RequestCase("logprobs-over-max", COMPLETIONS, {"logprobs": 100}, 400,
                "greater than max allowed: 20"),
    RequestCase("prompt-logprobs-over-max", COMPLETIONS, {"prompt_logprobs": 100}, 400,
                "Requested prompt logprobs of 100"),
    RequestCase("stop-not-string", COMPLETIONS, {"stop": 5}, 400, field("stop")),
    RequestCase("logit-bias-out-of-vocab", COMPLETIONS, {"logit_bias": {"100000": 1}}, 400,
                "out-of-vocab"),
    RequestCase("min-over-max-tokens", COMPLETIONS, {"min_tokens": 10, "max_tokens": 2}, 400,
                "min_tokens must be less than or equal to max_tokens"),
    RequestCase("bad-regex", COMPLETIONS, {"structured_outputs": {"regex": "("}}, 400,
                "invalid regex"),
    # -- chat -------------------------------------------------------------------------------
    RequestCase("chat-no-messages", CHAT, {}, 400, field("messages"), drop=("messages",)),
    RequestCase("chat-messages-not-list", CHAT, {"messages": "hi"}, 400, "valid list"),
    RequestCase("chat-empty-messages", CHAT, {"messages": []}, 400, "empty conversation"),
    RequestCase("chat-message-without-role", CHAT, {"messages": [{"content": "hi"}]}, 400,
                field("role")),
    RequestCase("chat-content-not-text", CHAT, {"messages": [{"role": "user", "content": 5}]},
                400, field("content")),
    RequestCase("chat-unknown-adapter", CHAT, {"model": "no-such-adapter"}, 404,
                "does not exist"),
    RequestCase("chat-top-logprobs-over-max", CHAT, {"logprobs": True, "top_logprobs": 100},
                400, "greater than max allowed: 20"),
    # -- load / unload ----------------------------------------------------------------------
    RequestCase("load-body-not-json", LOAD, b"{not json", 400, "JSON decode error"),
    RequestCase("load-no-path", LOAD, {}, 400, "lora_path", drop=("lora_path",)),
    RequestCase("load-no-name", LOAD, {}, 400, "lora_name", drop=("lora_name",)),
    RequestCase("load-empty-name", LOAD, {"lora_name": ""}, 400,
                "Both 'lora_name' and 'lora_path' must be provided"),
    RequestCase("load-empty-path", LOAD, {"lora_path": ""}, 400,
                "Both 'lora_name' and 'lora_path' must be provided"),
    RequestCase("load-path-not-string", LOAD, {"lora_path": 5}, 400, "valid string"),
    RequestCase("load-name-taken", LOAD, {"lora_name": "flora-r1"}, 400,
                "has already been loaded"),
    RequestCase("load-name-is-base-model", LOAD, {"lora_name": "base"}, 400, "'base'"),
    RequestCase("unload-unknown", UNLOAD, {"lora_name": "no-such-adapter"}, 404,
                "cannot be found"),
    RequestCase("unload-no-name", UNLOAD, {}, 400, "lora_name", drop=("lora_name",)),
    RequestCase("unload-empty-name", UNLOAD, {"lora_name": ""}, 400,
                "'lora_name' needs to be provided"),
]

REQUEST_XFAIL: dict[str, str] = {
}


def _request_body(case: RequestCase, good: dict, model_sets: dict) -> dict:
    base = {
        COMPLETIONS: good["body"],
        CHAT: CHAT_BODY,
        LOAD: {"lora_name": case.id, "lora_path": model_sets["llama"]["flora-r4"]},
        UNLOAD: {"lora_name": "no-such-adapter"},
    }[case.endpoint]
    body = {**base, **case.body}
    for k in case.drop:
        del body[k]
    return body


@pytest.mark.parametrize("case", _params(REQUEST_CASES, REQUEST_XFAIL, unpack=False))
def test_bad_request_is_refused(case: RequestCase, good, model_sets):
    """Each broken request: the expected status and reason, then a good request still answers
    exactly as before."""
    c = good["client"]
    if isinstance(case.body, bytes):
        r = c.post(case.endpoint, content=case.body, headers={} if case.plain else JSON)
        sent = {}
    else:
        sent = _request_body(case, good, model_sets)
        r = c.post(case.endpoint, json=sent)
    if case.endpoint == LOAD and r.status_code == 200:  # wrongly loaded: undo, then fail
        c.post(UNLOAD, json={"lora_name": sent["lora_name"]})
    assert r.status_code == case.status, r.text
    error = _error(r)
    if isinstance(case.message, re.Pattern):
        assert case.message.search(error), r.text
    else:
        assert case.message in error, r.text
    _still_serving(good)


def test_runtime_loaded_flora_matches_static(good, model_sets, tmp_path):
    """/v1/load_lora_adapter of a FLoRA folder serves exactly like --lora-modules does, and
    unloading it makes the name a 404 again."""
    path = model_sets["llama"]["flora-r2"]
    r = good["client"].post("/v1/load_lora_adapter", json={"lora_name": "dyn", "lora_path": path})
    assert r.status_code == 200, r.text
    r = good["client"].post("/v1/completions", json={**good["body"], "model": "dyn"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["tokens"] == good["answer"]["tokens"]
    r = good["client"].post("/v1/unload_lora_adapter", json={"lora_name": "dyn"})
    assert r.status_code == 200, r.text
    r = good["client"].post("/v1/completions", json={**good["body"], "model": "dyn"})
    assert r.status_code == 404, r.text


@pytest.mark.parametrize(
    "name, status, kind, message",
    [("fault-oom", 503, "ServiceUnavailableError", "Out of memory loading adapter 'fault-oom'"),
     ("fault-torch", 400, "BadRequestError", "RuntimeError: injected by FLORA_TEST_LOAD_FAULT")],
)
def test_worker_load_errors_get_their_status(name, status, kind, message, good, model_sets):
    """Out of memory while loading (MemoryError / torch.OutOfMemoryError) is a 503 the client
    may retry, a torch error from the files a 400; neither is a 500, and neither leaves any
    state behind: the name is unknown afterwards and the same folder then loads and serves.
    (The worker raises them through the test seam FLORA_TEST_LOAD_FAULT, see conftest.)"""
    c = good["client"]
    path = model_sets["llama"]["flora-r2"]
    r = c.post(LOAD, json={"lora_name": name, "lora_path": path})
    assert r.status_code == status and r.json()["error"]["type"] == kind, r.text
    assert message in _error(r), r.text
    assert name not in {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert c.post(COMPLETIONS, json={**good["body"], "model": name}).status_code == 404
    assert c.post(LOAD, json={"lora_name": f"{name}-retry", "lora_path": path}).status_code == 200
    try:
        r = c.post(COMPLETIONS, json={**good["body"], "model": f"{name}-retry"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["logprobs"]["tokens"] == good["answer"]["tokens"]
    finally:
        assert c.post(UNLOAD, json={"lora_name": f"{name}-retry"}).status_code == 200
    _still_serving(good)


def test_failed_reload_keeps_the_adapter_served(good, model_sets, tmp_path):
    """A reload (`load_inplace`) from a broken folder is a 400, from a missing one a 404; either
    way the adapter keeps serving its old weights."""
    c = good["client"]
    path = model_sets["llama"]["flora-r2"]
    assert c.post(LOAD, json={"lora_name": "reload", "lora_path": path}).status_code == 200
    try:
        broken = edit_config(copy(path, str(tmp_path / "broken")), r=16)
        for bad, status, message in ((broken, 400, "--max-lora-rank 8"),
                                     (str(tmp_path / "missing"), 404, NOT_FOUND)):
            r = c.post(LOAD, json={"lora_name": "reload", "lora_path": bad, "load_inplace": True})
            assert r.status_code == status and message in _error(r), r.text
            r = c.post(COMPLETIONS, json={**good["body"], "model": "reload"})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["logprobs"]["tokens"] == good["answer"]["tokens"]
    finally:
        assert c.post(UNLOAD, json={"lora_name": "reload"}).status_code == 200


def test_bad_static_adapter_fails_startup(model_sets, tmp_path):
    """A broken adapter in --lora-modules stops the server at start-up with the reason."""
    paths = dict(model_sets["llama"])
    paths["flora-r1"] = edit_config(copy(paths["flora-r1"], str(tmp_path / "bad")), r=16)
    log = str(tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="exited"):
        serve(paths, 5, log).start(timeout=300)
    with open(log) as f:
        assert "--max-lora-rank 8" in f.read()


def test_flora_adapter_for_other_arch_is_refused(good, model_sets, tmp_path):
    """A StarCoder FLoRA adapter sent to the LLaMA server names modules the model lacks."""
    sc = model_sets["starcoder"]
    path = make_flora_adapter(sc["base"], str(tmp_path / "sc"), 1, ("c_fc",), 3)
    _load_refused(good, "sc", path, 400, "'c_fc'")
    _still_serving(good)


# Adapters that look odd but are valid: refusing them would be wrong (the tables above only
# hold adapters the server must refuse).
ACCEPTED: list[tuple[str, Callable[[Src], str]]] = [
    ("float16-weights", tensors(all_to(torch.float16))),
    ("bfloat16-weights", tensors(all_to(torch.bfloat16))),
    ("float64-weights", tensors(all_to(torch.float64))),
    ("extra-config-keys", cfg(task_type="CAUSAL_LM", notes={"a": [1, 2]})),
    ("int-alpha", cfg(flora_alpha=1)),
]
ACCEPTED_KINDS: list[tuple[str, Callable[[Src], str]]] = [  # other kinds: answers differ
    ("ia3-down-proj", ia3()),
    ("ia3-regex-targets", ia3(target_modules=r".*\.down_proj", feedforward_modules=r".*down_proj")),
    ("dora-every-lora-module", dora()),
]


@pytest.mark.parametrize(("case", "build"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_unusual_but_valid_adapter_is_served(case, build, good, model_sets, tmp_path):
    """Half-precision or float64 factors of the good adapter, extra config keys, an int alpha:
    loaded (200) and answering like the original (to rounding), then unloaded."""
    c = good["client"]
    path = build(_src(model_sets, str(tmp_path / case)))
    r = c.post(LOAD, json={"lora_name": case, "lora_path": path})
    assert r.status_code == 200, r.text
    try:
        r = c.post(COMPLETIONS, json={**good["body"], "model": case, "max_tokens": 1})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["tokens"] == good["answer"]["tokens"][:1]
        assert lp["token_logprobs"][0] == pytest.approx(good["answer"]["token_logprobs"][0],
                                                        abs=0.05)
    finally:
        assert c.post(UNLOAD, json={"lora_name": case}).status_code == 200
    _still_serving(good)


@pytest.mark.parametrize(("case", "build"), ACCEPTED_KINDS, ids=[c[0] for c in ACCEPTED_KINDS])
def test_other_peft_kinds_are_served_as_peft_computes_them(case, build, good, model_sets,
                                                           tmp_path):
    """PEFT-format folders of the other served kinds (IA3, targets as a list or as a regex;
    DoRA on every module of the good LoRA): loaded (200), answering as PEFT's own layers compute
    them (1e-3 in log-probability)."""
    from reference import load_reference, token_logprobs

    c = good["client"]
    path = build(_src(model_sets, str(tmp_path / case)))
    r = c.post(LOAD, json={"lora_name": case, "lora_path": path})
    assert r.status_code == 200, r.text
    try:
        r = c.post(COMPLETIONS, json={**good["body"], "model": case})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
    finally:
        assert c.post(UNLOAD, json={"lora_name": case}).status_code == 200
    tokens = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    ref = load_reference(model_sets["llama"]["base"], path)
    want = token_logprobs(ref, good["body"]["prompt"], tokens)
    assert lp["token_logprobs"] == pytest.approx(want, abs=1e-3)
    assert lp["token_logprobs"] != pytest.approx(good["answer"]["token_logprobs"], abs=1e-3)
    _still_serving(good)


@pytest.mark.parametrize(("kind", "factor"), [("flora", 1e15), ("lora", 1e18)])
def test_nan_answer_does_not_poison_the_next_request(kind, factor, good, model_sets, tmp_path):
    """A loadable adapter (finite weights, merged factor within float32) whose activations
    overflow answers NaN; the next requests, of other tenants, must not notice. A NaN left in
    state shared across requests (a slot read with weight 0) would leak into their answers."""
    c = good["client"]
    src = _src(model_sets, str(tmp_path / "huge"))
    path = tensors(scaled(factor), flora if kind == "flora" else lora)(src)
    r = c.post(LOAD, json={"lora_name": "huge", "lora_path": path})
    assert r.status_code == 200, r.text  # must load, or this test checks nothing
    try:
        r = c.post(COMPLETIONS, json={**good["body"], "model": "huge"})
        assert r.status_code == 400 and "not JSON compliant" in r.text, r.text  # NaN answer
        # Other tenants while the NaN adapter still sits in its slot.
        for _ in range(2):
            _still_serving(good)
            r = c.post(COMPLETIONS, json={**good["body"], "model": "base"})
            assert r.status_code == 200, r.text
    finally:
        assert c.post(UNLOAD, json={"lora_name": "huge"}).status_code == 200
    _still_serving(good)


# --- allowed adapter roots (a second server) ---------------------------------------------------


class Roots(NamedTuple):
    """The roots server, its reference answer, and the folders around its roots."""

    good: dict
    inside: str  # an allowed root besides the model set's folder
    outside: str  # a good FLoRA adapter outside every root


@pytest.fixture(scope="class")
def roots(model_sets, tmp_path_factory) -> Iterator[Roots]:
    """LLaMA server with FLORA_ADAPTER_ROOTS = the model set's folder (its static adapters live
    there) + a scratch root; a good adapter outside both, and a sibling folder whose name
    starts with the scratch root's."""
    models = os.path.dirname(os.path.dirname(model_sets["llama"]["base"]))
    inside = str(tmp_path_factory.mktemp("inside"))
    outside = copy(model_sets["llama"]["flora-r2"], str(tmp_path_factory.mktemp("out") / "flora"))
    copy(outside, inside + "-sibling/flora")
    log = str(tmp_path_factory.mktemp("logs") / "roots.log")
    env = {"FLORA_ADAPTER_ROOTS": os.pathsep.join([models, inside])}
    with serve(model_sets["llama"], len(ADAPTERS), log, env=env) as server:
        yield Roots(_good_answer(server.url), inside, outside)


PATH_CASES: list[AdapterCase] = [
    AdapterCase("outside-absolute", lambda s: s.outside, 403, REFUSED),
    AdapterCase("dotdot-escape", up_and_out, 403, REFUSED),
    AdapterCase("symlinked-folder", lambda s: symlink(s.outside, s.tmp), 403, REFUSED),
    AdapterCase("symlink-chain", symlink_chain, 403, REFUSED),
    AdapterCase("symlinked-weights", link_in(WEIGHTS, lambda s: f"{s.outside}/{WEIGHTS}"), 403,
                REFUSED),
    AdapterCase("symlinked-config", link_in(CONFIG, lambda s: f"{s.outside}/{CONFIG}"), 403,
                REFUSED),
    AdapterCase("dangling-symlink-out", link_in(WEIGHTS, lambda s: s.outside + "/nothing"),
                403, REFUSED),
    AdapterCase("symlinked-subfolder", link_in("extra", lambda s: s.outside), 403, REFUSED),
    AdapterCase("proc-self-root", lambda s: "/proc/self/root" + s.outside, 403, REFUSED),
    AdapterCase("sibling-with-root-prefix",
                lambda s: os.path.dirname(s.tmp) + "-sibling/flora", 403, REFUSED),
    AdapterCase("home-tilde", lambda s: "~/flora", 403, REFUSED),
    AdapterCase("relative-cwd", lambda s: ".", 403, REFUSED),
    AdapterCase("hub-id", lambda s: "someorg/some-adapter", 403, REFUSED),
    AdapterCase("s3-url", lambda s: "s3://bucket/adapter", 403, REFUSED),
    AdapterCase("http-url", lambda s: "http://example.com/adapter", 403, REFUSED),
    AdapterCase("file-url-inside", lambda s: "file://" + s.flora, 403, REFUSED),
    AdapterCase("nul-byte", lambda s: s.flora + "\x00/x", 400, "null byte"),
    AdapterCase("empty-path", lambda s: "", 400,
                "Both 'lora_name' and 'lora_path' must be provided"),
    AdapterCase("long-path-inside", lambda s: os.path.join(s.tmp, "a" * 5000), 400,
                "File name too long"),
    AdapterCase("missing-inside", lambda s: s.tmp, 404, NOT_FOUND),
]

PATH_XFAIL: dict[str, str] = {
}


class TestAllowedRoots:
    """With FLORA_ADAPTER_ROOTS set, every way out of the roots is 403 and nothing loads."""

    @pytest.mark.parametrize(("case", "build", "status", "message"),
                             _params(PATH_CASES, PATH_XFAIL))
    def test_path_is_refused(self, case, build, status, message, roots, model_sets):
        src = _src(model_sets, os.path.join(roots.inside, case), roots.outside)
        path = build(src)
        # `case` names a folder in a root when the case built one there: the resolver then
        # finds it and refuses it again, with the same status
        then = status if os.path.lexists(os.path.join(roots.inside, case)) else 404
        _load_refused(roots.good, case, path, status, message, then)
        _still_serving(roots.good)

    def test_symlink_between_roots_is_served(self, roots, model_sets):
        """A symlink in one root to an adapter in the other stays inside: it loads."""
        link = symlink(model_sets["llama"]["flora-r2"], os.path.join(roots.inside, "link"))
        c = roots.good["client"]
        r = c.post(LOAD, json={"lora_name": "linked", "lora_path": link})
        assert r.status_code == 200, r.text
        r = c.post(COMPLETIONS, json={**roots.good["body"], "model": "linked"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["logprobs"]["tokens"] == roots.good["answer"]["tokens"]
        assert c.post(UNLOAD, json={"lora_name": "linked"}).status_code == 200

    def test_roots_server_still_healthy(self, roots):
        """After every refused path: /health is 200 and answers are unchanged."""
        assert roots.good["client"].get("/health").status_code == 200
        _still_serving(roots.good)


UNKNOWN_NAMES = 10_000
RSS_MARGIN = 64 * 2**20  # bytes the API server may grow by over UNKNOWN_NAMES requests


def test_ten_thousand_unknown_adapter_names_stay_bounded(good, llama_server):
    """Clients choose the names: 10,000 distinct unknown ones, bare and as `base:<name>`, are
    each a 404 naming the model, leave no per-adapter series on /metrics, and the API server's
    memory does not grow with them (RSS within RSS_MARGIN after a warm-up)."""
    import psutil

    api_server = psutil.Process(llama_server.proc.pid)
    client = good["client"]

    def ask(i: int) -> tuple[int, bool]:
        name = f"nobody-{i}" if i % 2 else f"base:nobody-{i}"
        r = client.post(COMPLETIONS, json={**good["body"], "model": name, "max_tokens": 1})
        return r.status_code, name in _error(r)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, range(-500, 0)))  # warm-up: allocator, caches, logging
        rss_before = api_server.memory_info().rss
        answers = list(pool.map(ask, range(UNKNOWN_NAMES)))
    grown = api_server.memory_info().rss - rss_before
    print(f"API server RSS {rss_before / 2**20:.0f} MiB, grown {grown / 2**20:+.1f} MiB "
          f"over {UNKNOWN_NAMES} unknown names")
    assert answers == [(404, True)] * UNKNOWN_NAMES
    assert grown < RSS_MARGIN, f"API server RSS grew by {grown / 2**20:.0f} MiB"
    assert "nobody-" not in client.get("/metrics").text
    _still_serving(good)


def test_server_still_healthy_after_everything(good):
    """Last: after every malformed adapter and request above, the main server is healthy and
    answers exactly as before."""
    assert good["client"].get("/health").status_code == 200
    _still_serving(good)
    r = good["client"].get("/v1/models")
    served = {m["id"] for m in r.json()["data"]}
    assert served == {"base", *ADAPTERS}, served


def test_prompt_logprobs_with_adapters_in_one_batch(good, model_sets):
    """`prompt_logprobs` with LoRA on crashed vLLM 0.29's engine (vLLM #29955: the lm_head
    LoRA op got one request's prompt rows with the batch's per-request indices). FLoRA, LoRA and
    base requests asking for them at once, prompts longer than the chunked-prefill budget (64):
    each gets its prompt logprobs, equal to the dense reference's, and the server lives on."""
    from reference import load_reference, token_logprobs

    prompt = [(7 * i) % 500 + 2 for i in range(150)]
    models = ("flora-r2", "lora-r8", "base", "flora-r8")
    jobs = [{"model": m, "prompt": prompt, "max_tokens": 2, "temperature": 0,
             "prompt_logprobs": 2} for m in models]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda b: good["client"].post(COMPLETIONS, json=b), jobs))
    paths = model_sets["llama"]
    for model, r in zip(models, answers, strict=True):
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["prompt_logprobs"]
        assert len(served) == len(prompt) and served[0] is None
        got = [served[i][str(tok)]["logprob"] for i, tok in enumerate(prompt) if i]
        ref = load_reference(paths["base"], None if model == "base" else paths[model])
        want = token_logprobs(ref, prompt[:1], prompt[1:])
        assert got == pytest.approx(want, abs=1e-3), model
    assert good["client"].get("/health").status_code == 200
    _still_serving(good)
