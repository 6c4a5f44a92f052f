"""Load on loopback: one real vLLM server, 16+ FLoRA adapters, LoRA and base under 32+ concurrent
requests while adapters are unloaded, loaded back and added; every answer checked against the
dense oracle. Plus runtime reloads of a changed folder and unloads with requests in flight."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from reference import load_reference, token_logprobs

from flora_vllm.hooks.api_server import HOLD_DIR_ENV
from flora_vllm.serving.server import ServerProcess, lora_modules_args
from flora_vllm.testing.tiny import LLAMA_TARGETS, make_flora_adapter

TOL = 1e-3  # log-probability, float32
N_FLORA = 16  # FLoRA adapters registered at start
RANKS = (1, 2, 4, 8)
NEW = ("flora-new-a", "flora-new-b")  # FLoRA adapters first loaded while the load runs
CHURNED = ("flora-02", "flora-05", "flora-11", "lora-r8")  # unloaded and loaded back, repeatedly
N_REQUESTS = 240
CONCURRENCY = 32
MAX_TOKENS = 24
MAX_LORAS = 4  # device slots, far fewer than adapters: slots churn
MAX_CPU_LORAS = 10  # host cache, fewer than adapters: it evicts too
BLOCK = 32  # KV block size; prefix caching reuses only full blocks


def _flora_name(i: int) -> str:
    return f"flora-{i:02d}"


@dataclass
class LoadEnv:
    """The module's server and everything the tests need to ask it and check its answers."""

    server: ServerProcess
    paths: dict[str, str]  # every model name (base, adapters at start, NEW) -> folder
    log_path: str
    http: httpx.Client
    hold_dir: Path  # FLORA_TEST_HOLD_DIR: requests for `held-*` adapters wait here
    _refs: dict[str, torch.nn.Module] = field(default_factory=dict)

    def ref(self, name: str) -> torch.nn.Module:
        """The dense oracle for `name` (one per adapter, built on first use)."""
        if name not in self._refs:
            base = self.paths["base"]
            self._refs[name] = load_reference(base, None if name == "base" else self.paths[name])
        return self._refs[name]


@pytest.fixture(scope="module")
def env(
    model_sets: dict[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoadEnv]:
    """A LLaMA server with 16 FLoRA adapters (ranks 1/2/4/8) and one LoRA registered, 4 device
    slots and a 10-adapter host cache; two more FLoRA folders exist but are not registered."""
    demo = model_sets["llama"]
    base = demo["base"]
    root = tmp_path_factory.mktemp("load-adapters")
    paths = {"base": base}
    for i in range(N_FLORA):
        paths[_flora_name(i)] = make_flora_adapter(
            base, str(root / _flora_name(i)), RANKS[i % len(RANKS)], LLAMA_TARGETS, seed=1000 + i
        )
    paths["lora-r8"] = demo["lora-r8"]
    startup = {n: p for n, p in paths.items() if n != "base"}
    for j, name in enumerate(NEW):
        paths[name] = make_flora_adapter(base, str(root / name), 8 - 4 * j, LLAMA_TARGETS, 2000 + j)
    log_path = str(tmp_path_factory.mktemp("logs") / "load.log")
    hold_dir = tmp_path_factory.mktemp("hold")
    args = [
        "--served-model-name", "base",
        "--dtype", "float32",
        "--max-model-len", "512",
        "--max-loras", str(MAX_LORAS),
        "--max-cpu-loras", str(MAX_CPU_LORAS),
        "--max-lora-rank", "8",
        "--max-num-seqs", "40",
        "--max-num-batched-tokens", "64",
        "--enable-chunked-prefill",
        "--enable-prefix-caching",
        "--block-size", str(BLOCK),
        "--seed", "0",
        "--allow-runtime-adapters",
        *lora_modules_args(startup),
    ]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", HOLD_DIR_ENV: str(hold_dir)}
    server = ServerProcess(base, args=args, env=env, log_path=log_path)
    limits = httpx.Limits(max_connections=2 * CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    with server, httpx.Client(base_url=server.url, timeout=300, limits=limits) as http:
        yield LoadEnv(server, paths, log_path, http, hold_dir)


# --- asking and checking ------------------------------------------------------------------------


@dataclass
class Answer:
    """One completion request as the client saw it."""

    model: str
    prompt: list[int]
    sent: float  # time.monotonic() just before sending
    received: float  # ... and once the whole answer was in
    status: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    error: str = ""  # the error message of a non-200 answer


def _token_id(t: str) -> int:
    """ "token_id:N" -> N (`return_tokens_as_token_ids`: byte-level strings do not map back)."""
    m = re.fullmatch(r"token_id:(\d+)", t)
    assert m, f"not a token id: {t!r}"
    return int(m.group(1))


def _body(model: str, prompt: list[int], max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 1,
        "ignore_eos": True,  # every answer has exactly max_tokens tokens
        "return_tokens_as_token_ids": True,
        "stream": stream,
    }


def ask(http: httpx.Client, model: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> Answer:
    """A greedy completion of a token-id prompt (no retries: every status is the server's own)."""
    sent = time.monotonic()
    r = http.post("/v1/completions", json=_body(model, prompt, max_tokens))
    answer = Answer(model, prompt, sent, time.monotonic(), r.status_code)
    if r.status_code != 200:
        try:
            answer.error = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            answer.error = r.text[:500]
        return answer
    lp = r.json()["choices"][0]["logprobs"]
    answer.tokens = [_token_id(t) for t in lp["tokens"]]
    answer.logprobs = list(lp["token_logprobs"])
    return answer


@torch.no_grad()
def _argmax_gaps(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> list[float]:
    """Per completion token: the reference's best log-prob minus that of the token (0 if it is
    the reference's greedy choice)."""
    logits = model(torch.tensor([prompt + completion])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt) - 1
    return [(logp[start + i].max() - logp[start + i, t]).item() for i, t in enumerate(completion)]


def mismatch(ref: torch.nn.Module, answer: Answer, max_tokens: int = MAX_TOKENS) -> str | None:
    """Why a 200 answer is not the oracle's (None when it is): every served log-prob within TOL of
    the oracle's for the same token, and every token the oracle's greedy choice up to a tie."""
    if len(answer.tokens) != max_tokens or len(answer.logprobs) != max_tokens:
        return f"{len(answer.tokens)} tokens / {len(answer.logprobs)} logprobs, not {max_tokens}"
    expected = token_logprobs(ref, answer.prompt, answer.tokens)
    diffs = [abs(a - b) for a, b in zip(answer.logprobs, expected, strict=True)]
    bad = [i for i, d in enumerate(diffs) if not d <= TOL]  # `not <=` also catches NaN
    if bad:
        i = bad[0]
        return (
            f"|Δ logprob| > {TOL} at {len(bad)}/{len(diffs)} tokens, first at {i}: served "
            f"{answer.logprobs[i]:.6f}, oracle {expected[i]:.6f} (max |Δ| {max(diffs):.2e})"
        )
    gaps = _argmax_gaps(ref, answer.prompt, answer.tokens)
    if max(gaps) > TOL:
        i = max(range(len(gaps)), key=gaps.__getitem__)
        return f"token {i} ({answer.tokens[i]}) is not the oracle's greedy pick (gap {gaps[i]:.3g})"
    return None


def _moved(ref_old: torch.nn.Module, answer: Answer) -> float:
    """max |Δ| between the served log-probs and `ref_old`'s for the same tokens."""
    old = token_logprobs(ref_old, answer.prompt, answer.tokens)
    return max(abs(a - b) for a, b in zip(answer.logprobs, old, strict=True))


def _metric(http: httpx.Client, name: str) -> float:
    """Sum of a Prometheus counter over its label sets."""
    lines = [ln for ln in http.get("/metrics").text.splitlines() if ln.startswith(name)]
    assert lines, f"{name} missing from /metrics"
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def load_adapter(http: httpx.Client, name: str, path: str, inplace: bool = False) -> None:
    body = {"lora_name": name, "lora_path": path, **({"load_inplace": True} if inplace else {})}
    r = http.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200, f"load {name}: {r.status_code} {r.text}"


def unload_adapter(http: httpx.Client, name: str) -> None:
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert r.status_code == 200, f"unload {name}: {r.status_code} {r.text}"


def _log_excerpt(log_path: str, pattern: str = r"ERROR|Traceback|Exception", n: int = 30) -> str:
    """Lines of the server log matching `pattern` (the first n), for failure messages."""
    with open(log_path, errors="replace") as f:
        hits = [ln for ln in f if re.search(pattern, ln)]
    return "".join(hits[:n])


def _is_gone_404(answer: Answer) -> bool:
    """A clear 404: status 404 and a message that names the model asked for."""
    return answer.status == 404 and f"`{answer.model}`" in answer.error


# --- the load -------------------------------------------------------------------------------------


def _load_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n token-id prompts: half 8-20 random tokens, half a shared 33-token prefix (one full KV
    block, so prefix caching reuses it per adapter and must not across adapters) + 3-8 tokens."""
    rng = random.Random(seed)
    prefix = [rng.randrange(2, 500) for _ in range(BLOCK + 1)]
    out = []
    for i in range(n):
        if i % 2:
            out.append(prefix + [rng.randrange(2, 500) for _ in range(rng.randint(3, 8))])
        else:
            out.append([rng.randrange(2, 500) for _ in range(rng.randint(8, 20))])
    return out


@dataclass
class Churn:
    """What the churn thread did: per adapter the intervals it was not registered, and errors."""

    gone: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    cycles_under_load: int = 0  # unloads made while requests were in flight
    probes: list[Answer] = field(default_factory=list)  # asked while the adapter was gone
    errors: list[str] = field(default_factory=list)


def _churn(
    env: LoadEnv, stop: threading.Event, warm: threading.Event, in_flight: list[int], out: Churn
) -> None:
    """Once traffic flows, load the NEW adapters, then unload and reload CHURNED ones in turn
    (each gone ~0.1 s, probed for its 404) until `stop`."""
    try:
        warm.wait(timeout=300)
        for name in NEW:
            load_adapter(env.http, name, env.paths[name])
            out.gone[name] = [(-math.inf, time.monotonic())]
        k = 0
        while not stop.is_set():
            name = CHURNED[k % len(CHURNED)]
            k += 1
            t0 = time.monotonic()
            busy = in_flight[0] > 0
            unload_adapter(env.http, name)
            out.probes.append(ask(env.http, name, [5, 6, 7, 8]))
            time.sleep(0.1)
            load_adapter(env.http, name, env.paths[name])
            out.gone.setdefault(name, []).append((t0, time.monotonic()))
            out.cycles_under_load += busy and in_flight[0] > 0
            stop.wait(0.1)
    except Exception as e:  # noqa: BLE001 -- reported by the test, not lost in the thread
        out.errors.append(f"{type(e).__name__}: {e}")


def _may_be_gone(answer: Answer, churn: Churn) -> bool:
    """The request's [sent, received] overlaps a time its adapter was not registered."""
    spans = churn.gone.get(answer.model, [])
    return any(answer.sent <= t1 and answer.received >= t0 for t0, t1 in spans)


def test_load_with_adapter_churn(env: LoadEnv, tmp_path: Path) -> None:
    """240 requests, 32 at a time, spread over base, 16 FLoRA adapters, LoRA and 2 FLoRA adapters
    added mid-run, while 4 adapters are unloaded and loaded back again and again: no failures but
    404s for an adapter while it was gone, and every answer equal to the oracle's."""
    models = ["base", *[_flora_name(i) for i in range(N_FLORA)], "lora-r8", *NEW]
    prompts = _load_prompts(N_REQUESTS)
    jobs = [(models[i % len(models)], prompts[i]) for i in range(N_REQUESTS)]
    random.Random(1).shuffle(jobs)

    lock = threading.Lock()
    in_flight = [0]
    peak = [0]
    done = [0]
    warm, stop = threading.Event(), threading.Event()

    def one(job: tuple[str, list[int]]) -> Answer:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            return ask(env.http, *job)
        finally:
            with lock:
                in_flight[0] -= 1
                done[0] += 1
                if done[0] >= N_REQUESTS // 10:
                    warm.set()

    hits_before = _metric(env.http, "vllm:prefix_cache_hits_total")
    churn = Churn()
    churner = threading.Thread(target=_churn, args=(env, stop, warm, in_flight, churn))
    t_start = time.monotonic()
    churner.start()
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            answers = list(pool.map(one, jobs))
    finally:
        stop.set()
        churner.join(timeout=120)
    duration = time.monotonic() - t_start
    hits = _metric(env.http, "vllm:prefix_cache_hits_total") - hits_before

    ok = [a for a in answers if a.status == 200]
    gone = [a for a in answers if _is_gone_404(a) and _may_be_gone(a, churn)]
    failed = [a for a in answers if a.status != 200 and not any(a is g for g in gone)]
    wrong = {}
    for a in ok:
        why = mismatch(env.ref(a.model), a)
        if why:
            wrong.setdefault(a.model, []).append(why)
    summary = {
        "requests": len(answers),
        "ok": len(ok),
        "gone404": len(gone),
        "failed": len(failed),
        "wrong": sum(map(len, wrong.values())),
        "duration_s": round(duration, 1),
        "concurrency": CONCURRENCY,
        "peak_in_flight": peak[0],
        "flora_adapters": N_FLORA + len(NEW),
        "lora_adapters": 1,
        "churn_cycles_under_load": churn.cycles_under_load,
        "probes_404": sum(map(_is_gone_404, churn.probes)),
        "prefix_cache_hits": hits,
    }
    (tmp_path / "load_summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"\nLOAD: requests={len(answers)} ok={len(ok)} gone404={len(gone)} failed={len(failed)} "
        f"wrong={summary['wrong']} duration={duration:.1f}s concurrency={CONCURRENCY} "
        f"(peak {peak[0]} in flight) adapters={N_FLORA + len(NEW)} flora, 1 lora + base; "
        f"churn cycles={churn.cycles_under_load} prefix-cache hits={hits:.0f}"
    )

    assert not churn.errors, f"churn thread: {churn.errors}\n{_log_excerpt(env.log_path)}"
    assert not failed, (
        "failed requests: "
        + "; ".join(f"{a.model}: {a.status} {a.error[:200]}" for a in failed[:10])
        + f"\n{_log_excerpt(env.log_path)}"
    )
    assert not wrong, "answers differ from the dense merged model: " + "; ".join(
        f"{m}: {len(w)} answers, e.g. {w[0]}" for m, w in wrong.items()
    )
    bad_probes = [(p.status, p.error) for p in churn.probes if not _is_gone_404(p)]
    assert not bad_probes, f"a request for an unloaded adapter was not a clear 404: {bad_probes}"
    served = {a.model for a in ok}
    assert served == set(models), f"models never served: {set(models) - served}"
    assert peak[0] >= CONCURRENCY, f"only {peak[0]} requests were ever in flight at once"
    assert churn.cycles_under_load >= 2 * len(CHURNED), (
        f"only {churn.cycles_under_load} unload/load cycles ran under traffic"
    )
    assert hits > 0, "prefix caching was never exercised"


# --- reloads ------------------------------------------------------------------------------------


def _long_prompt(seed: int, n: int = BLOCK + 13) -> list[int]:
    """A prompt longer than one KV block, so asking it again can reuse a cached block."""
    rng = random.Random(seed)
    return [rng.randrange(2, 500) for _ in range(n)]


def _overwrite(folder: str, base: str, seed: int, tmp: Path) -> None:
    """Replace the adapter files in `folder` in place by a new random adapter (same rank)."""
    rank = json.loads(Path(folder, "adapter_config.json").read_text())["r"]
    fresh = make_flora_adapter(base, str(tmp / f"fresh-{seed}"), rank, LLAMA_TARGETS, seed)
    for f in os.listdir(fresh):
        shutil.copyfile(os.path.join(fresh, f), os.path.join(folder, f))


def test_reload_changed_folder_serves_new_weights(env: LoadEnv, tmp_path: Path) -> None:
    """Reloading a changed folder under the same name serves the new weights, both through
    `load_inplace` and through unload + load, even for the very prompt whose KV blocks were
    cached under that name with the old weights."""
    base, name = env.paths["base"], "reloaded"
    folder = make_flora_adapter(base, str(tmp_path / "adapter"), 4, LLAMA_TARGETS, seed=3000)
    prompt = _long_prompt(7)
    hits_before = _metric(env.http, "vllm:prefix_cache_hits_total")

    load_adapter(env.http, name, folder)
    refs = [load_reference(base, folder)]
    first = [ask(env.http, name, prompt) for _ in range(2)]  # the second can hit the cache
    for a in first:
        assert a.status == 200, a.error
        assert mismatch(refs[0], a) is None, mismatch(refs[0], a)

    problems = []  # both paths are checked even when the first fails
    for step, seed in (("load_inplace", 3001), ("unload + load", 3002)):
        _overwrite(folder, base, seed, tmp_path)
        refs.append(load_reference(base, folder))
        if step == "load_inplace":
            load_adapter(env.http, name, folder, inplace=True)
        else:
            unload_adapter(env.http, name)
            load_adapter(env.http, name, folder)
        for k, a in enumerate([ask(env.http, name, prompt) for _ in range(2)]):
            if a.status != 200:
                problems.append(f"{step}, ask {k}: {a.status} {a.error}")
            elif why := mismatch(refs[-1], a):
                problems.append(f"{step}, ask {k}: not the new weights' answer: {why}")
            elif (moved := _moved(refs[-2], a)) <= 0.05:
                problems.append(f"{step}, ask {k}: still the old weights' answer ({moved:.2e})")
    assert not problems, "\n".join(problems)

    hits = _metric(env.http, "vllm:prefix_cache_hits_total") - hits_before
    assert hits >= BLOCK, f"the repeated prompt never hit the prefix cache ({hits} tokens)"
    unload_adapter(env.http, name)


# --- unload with requests in flight ---------------------------------------------------------------


def _stream(
    http: httpx.Client, model: str, prompt: list[int], max_tokens: int, started: threading.Event
) -> tuple[Answer, list[float]]:
    """A streamed greedy completion; `started` is set at the first token. Returns the answer and
    the time each token arrived."""
    sent = time.monotonic()
    tokens, logprobs, arrived, error = [], [], [], ""
    with http.stream("POST", "/v1/completions", json=_body(model, prompt, max_tokens, True)) as r:
        status = r.status_code
        if status != 200:
            error = r.read().decode(errors="replace")[:500]
        for line in r.iter_lines() if status == 200 else ():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                error = str(chunk["error"])
                break
            lp = chunk["choices"][0]["logprobs"]
            if lp and lp["tokens"]:
                tokens += [_token_id(t) for t in lp["tokens"]]
                logprobs += lp["token_logprobs"]
                arrived += [time.monotonic()] * len(lp["tokens"])
                started.set()
    started.set()  # an early failure must not leave the test waiting
    answer = Answer(model, prompt, sent, time.monotonic(), status, tokens, logprobs, error)
    if error and status == 200:
        answer.status = -1  # an error in the middle of a stream
    return answer, arrived


def test_unload_with_requests_in_flight(env: LoadEnv, tmp_path: Path) -> None:
    """Unloading adapter Y while its requests (and other adapters') are being generated, then
    replacing Y's files and loading Y again: every request in flight finishes with the oracle's
    answer, Y's on the weights they started with; while Y is gone a new request for it is a 404
    naming it, and once reloaded a new request gets the new weights."""
    base, y = env.paths["base"], "inflight-y"
    folder = make_flora_adapter(base, str(tmp_path / "y"), 4, LLAMA_TARGETS, seed=4000)
    fresh = make_flora_adapter(base, str(tmp_path / "y-new"), 4, LLAMA_TARGETS, seed=4001)
    ref_old, ref_new = load_reference(base, folder), load_reference(base, fresh)
    load_adapter(env.http, y, folder)
    max_tokens = 64
    jobs = [(y, _long_prompt(20 + i, BLOCK + 8 + 3 * i)) for i in range(3)]  # cacheable
    jobs += [(m, _long_prompt(30 + i, 12)) for i, m in enumerate(["flora-08", "lora-r8", "base"])]
    started = [threading.Event() for _ in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(_stream, env.http, m, p, max_tokens, ev)
            for (m, p), ev in zip(jobs, started, strict=True)
        ]
        for ev in started:
            assert ev.wait(timeout=300), "a streamed request never produced a token"
        unload_adapter(env.http, y)
        gone = ask(env.http, y, [5, 6, 7, 8])
        for f in os.listdir(fresh):
            shutil.copyfile(os.path.join(fresh, f), os.path.join(folder, f))
        load_adapter(env.http, y, folder)
        reloaded = time.monotonic()
        new = ask(env.http, y, jobs[0][1])  # the prompt of an old-weights request in flight
        results = [f.result(timeout=600) for f in futures]
    unload_adapter(env.http, y)

    assert gone.status == 404 and f"`{y}`" in gone.error, (gone.status, gone.error)
    for answer, _ in results:
        assert answer.status == 200, f"{answer.model}: {answer.status} {answer.error}"
        ref = ref_old if answer.model == y else env.ref(answer.model)
        why = mismatch(ref, answer, max_tokens)
        assert why is None, f"{answer.model} (in flight during the unload): {why}"
    # Y's requests were still generating after Y was unloaded and loaded again with new files.
    late = [sum(t > reloaded for t in arrived) for a, arrived in results if a.model == y]
    print(f"\nIN-FLIGHT: {y}'s requests got {late} of {max_tokens} tokens after the reload")
    assert all(n > 0 for n in late), f"{y}'s requests ended before the reload: {late}"
    assert new.status == 200, (new.status, new.error)
    assert _moved(ref_old, new) > 0.05, "the reloaded adapter answers like the old weights"
    assert mismatch(ref_new, new) is None, f"reloaded {y}: {mismatch(ref_new, new)}"


# --- the forced race: a request between adapter resolution and the engine -----------------------

OLD_GRACE_S = 2.0  # the timer this replaced kept a retired adapter 2 s; the hold outlasts it


def _held(hold_dir: Path, n: int, timeout: float = 120.0) -> list[tuple[str, int]]:
    """Wait until n requests are held between resolution and the engine; (adapter, id) each."""
    deadline = time.monotonic() + timeout
    while len(files := sorted(hold_dir.glob("*.held"))) < n:
        assert time.monotonic() < deadline, f"only {len(files)} of {n} requests were held"
        time.sleep(0.05)
    return [(name, int(i)) for name, i in (f.read_text().split() for f in files)]


@pytest.mark.line
def test_request_held_across_unload_and_reload(env: LoadEnv, tmp_path: Path) -> None:
    """A request resolves adapter `held-x` and is held before the engine (longer than the old
    grace timer) while `held-x` is unloaded, its files replaced and loaded again; three requests
    for the new weights wait with it. Released together, one batch holds both ids of one name
    (neither in a device slot): the first request answers with the weights it resolved, the
    others with the new ones, the server stays healthy, the old id leaves the engine once its
    request is done, and the next requests are right."""
    base, name = env.paths["base"], "held-x"
    folder = make_flora_adapter(base, str(tmp_path / "adapter"), 4, LLAMA_TARGETS, seed=5000)
    fresh = make_flora_adapter(base, str(tmp_path / "fresh"), 4, LLAMA_TARGETS, seed=5001)
    ref_old, ref_new = load_reference(base, folder), load_reference(base, fresh)
    prompts = [_long_prompt(60 + i) for i in range(4)]
    load_adapter(env.http, name, folder)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(ask, env.http, name, prompts[0])
            ((_, old_id),) = _held(env.hold_dir, 1)
            unload_adapter(env.http, name)
            for f in os.listdir(fresh):  # the same folder, new weights
                shutil.copyfile(os.path.join(fresh, f), os.path.join(folder, f))
            load_adapter(env.http, name, folder)
            later = [pool.submit(ask, env.http, name, p) for p in prompts[1:]]
            held = _held(env.hold_dir, 4)
            # Four other adapters take the four device slots: neither id of `held-x` is
            # active when the held requests enter one batch, so both must be activated.
            for other in [_flora_name(i) for i in range(MAX_LORAS)]:
                a = ask(env.http, other, prompts[0], max_tokens=2)
                assert a.status == 200, (other, a.status, a.error)
            time.sleep(OLD_GRACE_S + 1.0)  # provokes the old timer; nothing here waits on time
            (env.hold_dir / "release").touch()
            answers = [first.result(timeout=300)] + [f.result(timeout=300) for f in later]
    finally:
        (env.hold_dir / "release").touch()
    new_ids = {i for n, i in held} - {old_id}
    assert len(new_ids) == 1 and {n for n, _ in held} == {name}, held

    problems = []
    for k, (a, ref) in enumerate(zip(answers, [ref_old] + [ref_new] * 3, strict=True)):
        if a.status != 200:
            problems.append(f"request {k}: {a.status} {a.error}")
        elif why := mismatch(ref, a):
            problems.append(f"request {k} ({'old' if k == 0 else 'new'} weights): {why}")
    assert not problems, "\n".join(problems) + f"\n{_log_excerpt(env.log_path)}"
    assert _moved(ref_new, answers[0]) > 0.05, "the held request got the new weights"

    released = f"released adapter id {old_id} from the engine"
    deadline = time.monotonic() + 60
    while released not in Path(env.log_path).read_text(errors="replace"):
        assert time.monotonic() < deadline, f"old id {old_id} never left the engine"
        time.sleep(0.1)
    assert env.http.get("/health").status_code == 200
    for model, ref in (("base", env.ref("base")), (name, ref_new)):
        (env.hold_dir / "release").touch()
        a = ask(env.http, model, prompts[0])
        assert a.status == 200 and mismatch(ref, a) is None, (model, a.status, a.error)
    unload_adapter(env.http, name)


# --- what the worker reads, and the engine core's last defense ------------------------------------


def _resident(http: httpx.Client, name: str) -> list[str]:
    """The locations (device / host) where the workers hold adapter `name` now."""
    pattern = re.compile(r'^flora:adapter_resident\{(.*)\} (\S+)$')
    where = []
    for line in http.get("/metrics").text.splitlines():
        if (m := pattern.match(line)) and f'adapter="{name}"' in m.group(1):
            if float(m.group(2)) > 0:
                where.append(re.search(r'location="(\w+)"', m.group(1)).group(1))
    return where


def test_evicted_adapter_comes_back_with_the_weights_it_was_loaded_with(
    env: LoadEnv, tmp_path: Path
) -> None:
    """vLLM's worker cache (--max-cpu-loras 10) drops an adapter id when other adapters need
    room, and loads it again from its path on its next request. Its folder is rewritten in
    place meanwhile: the id still answers with the weights it was loaded with (the worker reads
    the server's copy, never the client's folder); only a reload serves the new files."""
    base, name = env.paths["base"], "evicted-x"
    folder = make_flora_adapter(base, str(tmp_path / "adapter"), 4, LLAMA_TARGETS, seed=6000)
    ref_old = load_reference(base, folder)
    load_adapter(env.http, name, folder)
    try:
        a = ask(env.http, name, _long_prompt(70))
        assert a.status == 200 and mismatch(ref_old, a) is None, (a.status, a.error)
        _overwrite(folder, base, 6001, tmp_path)
        ref_new = load_reference(base, folder)
        for other in [_flora_name(i) for i in range(N_FLORA)]:  # > MAX_CPU_LORAS other ids
            b = ask(env.http, other, _long_prompt(71), max_tokens=2)
            assert b.status == 200, (other, b.status, b.error)
        assert _resident(env.http, name) == [], "the worker cache still holds the adapter"
        a = ask(env.http, name, _long_prompt(72))  # a new prompt: no cached KV blocks
        assert a.status == 200, a.error
        assert mismatch(ref_old, a) is None, mismatch(ref_old, a)
        assert _moved(ref_new, a) > 0.05, "the evicted id came back with the rewritten files"
        load_adapter(env.http, name, folder, inplace=True)  # a reload reads the new files
        a = ask(env.http, name, _long_prompt(72))
        assert a.status == 200 and mismatch(ref_new, a) is None, (a.status, a.error)
    finally:
        unload_adapter(env.http, name)


def test_request_refused_by_the_engine_core_gets_its_reason(env: LoadEnv, tmp_path: Path) -> None:
    """The engine core's last defense: a request that reaches it with an adapter id it already
    dropped fails alone. Test seam: a `held-gone-*` request has its id removed from the engine
    past the API server's references (as a bug or a second API server could). Its client gets
    a 503 that says why, streamed or not (stock vLLM: a bare 500 "Internal server error"), and
    requests of other adapters sent with it are answered."""
    base, name = env.paths["base"], "held-gone-x"
    folder = make_flora_adapter(base, str(tmp_path / "adapter"), 2, LLAMA_TARGETS, seed=6100)
    (env.hold_dir / "release").touch()  # held requests pass at once; the seam then removes
    why = re.compile(r"adapter 'held-gone-x' \(id \d+\) was unloaded from the engine before")
    problems = []
    try:
        for stream in (False, True):
            load_adapter(env.http, name, folder, inplace=stream)  # a fresh id each time
            with ThreadPoolExecutor(2) as pool:
                gone = pool.submit(
                    env.http.post, "/v1/completions", json=_body(name, [5, 6, 7], 4, stream)
                )
                other = ask(env.http, "flora-01", _long_prompt(73))
                r = gone.result(timeout=120)
            if other.status != 200 or (m := mismatch(env.ref("flora-01"), other)):
                problems.append(f"stream={stream}: the other tenant got {other.status} {m}")
            if not stream:
                error = r.json().get("error", {})
                if r.status_code != 503 or not why.search(error.get("message", "")):
                    problems.append(f"not a 503 with the reason: {r.status_code} {r.text[:300]}")
            else:  # the stream had started (200): its error event carries status and reason
                events = [json.loads(ln[6:]) for ln in r.text.splitlines()
                          if ln.startswith("data: {")]
                errors = [e["error"] for e in events if "error" in e]
                if not errors or errors[0].get("code") != 503 or not why.search(
                    errors[0].get("message", "")
                ):
                    problems.append(f"stream: no 503 error event with the reason: {r.text[:300]}")
    finally:
        unload_adapter(env.http, name)
    assert not problems, "\n".join(problems) + f"\n{_log_excerpt(env.log_path)}"
    assert env.http.get("/health").status_code == 200


def test_lora_requests_info_has_one_series_after_all_this(env: LoadEnv) -> None:
    """Last: after the churn above (20+ adapters in every running/waiting combination), vLLM's
    `vllm:lora_requests_info` holds one series (stock: one per combination ever seen), with at
    most LORA_INFO_NAMES names per label."""
    from flora_vllm.hooks.api_metrics import LORA_INFO_NAMES

    ask(env.http, "flora-03", _long_prompt(74), max_tokens=2)  # a fresh record to scrape
    series = [ln for ln in env.http.get("/metrics").text.splitlines()
              if ln.startswith("vllm:lora_requests_info{")]
    assert len(series) == 1, series[:5]
    for label in re.findall(r'(?:running|waiting)_lora_adapters="([^"]*)"', series[0]):
        assert len([n for n in label.split(",") if n and "more" not in n]) <= LORA_INFO_NAMES
