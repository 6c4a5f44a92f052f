"""Bad adapters and bad requests get a clear error with the right HTTP status, and the server
keeps serving everyone else (checked after every case with a known-good FLoRA request)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import httpx
import pytest
import torch
from conftest import serve
from safetensors.torch import load_file, save_file

from flora_vllm.tiny import LLAMA_TARGETS, make_flora_adapter, make_lora_adapter

WEIGHTS = "flora_model.safetensors"
CONFIG = "adapter_config.json"


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: str, **changes: object) -> str:
    with open(os.path.join(d, CONFIG)) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(d, CONFIG), "w") as f:
        json.dump(cfg, f)
    return d


def _edit_tensors(d: str, fn: Callable[[dict[str, torch.Tensor]], None]) -> str:
    tensors = load_file(os.path.join(d, WEIGHTS))
    fn(tensors)
    save_file(tensors, os.path.join(d, WEIGHTS))
    return d


def _first(tensors: dict[str, torch.Tensor], suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _write(d: str, name: str, data: bytes) -> str:
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    return d


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[_first(t, "flora_A.weight")][0, 3] = float("nan")


def _inf(t: dict[str, torch.Tensor]) -> None:
    t[_first(t, "flora_B.weight")][5, 0] = float("inf")


def _wrong_shape(t: dict[str, torch.Tensor]) -> None:
    k = _first(t, "flora_A.weight")
    t[k] = torch.ones(t[k].shape[0], t[k].shape[1] + 3)


def _int_dtype(t: dict[str, torch.Tensor]) -> None:
    k = _first(t, "flora_B.weight")
    t[k] = t[k].to(torch.int32)


def _drop_b(t: dict[str, torch.Tensor]) -> None:
    del t[_first(t, "flora_B.weight")]


def _unknown_module(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.layers.9.mlp.up_proj.flora_A.weight"] = torch.ones(2, 256)


def _bad_key(t: dict[str, torch.Tensor]) -> None:
    t["something.else"] = torch.ones(2)


# (case id, builder(tmp dir, good FLoRA dir, model dir) -> adapter path, status, message part)
ERROR_CASES: list[tuple[str, Callable[[str, str, str], str], int, str]] = [
    ("missing-folder", lambda t, g, m: os.path.join(t, "nope"), 404, "No adapter found"),
    ("no-weights", lambda t, g, m: (os.remove(_copy(g, t) + "/" + WEIGHTS), t)[1], 400,
     "missing weights file"),
    ("corrupt-weights", lambda t, g, m: _write(_copy(g, t), WEIGHTS, b"\x00garbage" * 50), 400,
     "not a readable safetensors"),
    ("truncated-weights", lambda t, g, m: _write(
        _copy(g, t), WEIGHTS, open(os.path.join(g, WEIGHTS), "rb").read()[:5000]), 400,
     "not a readable safetensors"),
    ("bad-json", lambda t, g, m: _write(_copy(g, t), CONFIG, b"{not json"), 400, "Invalid adapter"),
    ("unknown-peft-type", lambda t, g, m: _edit_config(_copy(g, t), peft_type="IA3"), 400,
     "unknown peft_type 'IA3'"),
    ("rank-over-limit", lambda t, g, m: _edit_config(_copy(g, t), r=16), 400,
     "--max-lora-rank 8"),
    ("huge-rank", lambda t, g, m: _edit_config(_copy(g, t), r=10**9), 400, "--max-lora-rank"),
    ("negative-rank", lambda t, g, m: _edit_config(_copy(g, t), r=-2), 400, "positive integer"),
    ("nan-alpha", lambda t, g, m: _write(_copy(g, t), CONFIG, json.dumps(
        {"peft_type": "FLORA", "r": 2, "flora_alpha": float("nan"),
         "target_modules": list(LLAMA_TARGETS)}).encode()), 400, "flora_alpha"),
    ("unknown-target", lambda t, g, m: _edit_config(
        _copy(g, t), target_modules=[*LLAMA_TARGETS, "attn_proj"]), 400, "'attn_proj'"),
    ("nan-values", lambda t, g, m: _edit_tensors(_copy(g, t), _nan), 400, "NaN or inf"),
    ("inf-values", lambda t, g, m: _edit_tensors(_copy(g, t), _inf), 400, "NaN or inf"),
    ("wrong-shape", lambda t, g, m: _edit_tensors(_copy(g, t), _wrong_shape), 400, "has shape"),
    ("int-dtype", lambda t, g, m: _edit_tensors(_copy(g, t), _int_dtype), 400, "float type"),
    ("missing-factor", lambda t, g, m: _edit_tensors(_copy(g, t), _drop_b), 400, "is missing"),
    ("module-model-lacks", lambda t, g, m: _edit_tensors(_copy(g, t), _unknown_module), 400,
     "not an adaptable linear module"),
    ("stray-tensor", lambda t, g, m: _edit_tensors(_copy(g, t), _bad_key), 400,
     "unexpected tensor"),
    ("lora-rank-over-limit", lambda t, g, m: make_lora_adapter(m, t, 16, ("q_proj",), 1), 400,
     "max_lora_rank"),
]


@pytest.fixture(scope="module")
def good(llama_server, model_sets) -> dict:
    """A reference answer of a FLoRA adapter, to check the server still serves correctly."""
    client = httpx.Client(base_url=llama_server.url, timeout=300)
    body = {"model": "flora-r2", "prompt": [11, 22, 33, 44, 55], "max_tokens": 6,
            "temperature": 0, "logprobs": 1, "return_tokens_as_token_ids": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return {"client": client, "body": body, "answer": r.json()["choices"][0]["logprobs"]}


def _still_serving(good: dict) -> None:
    r = good["client"].post("/v1/completions", json=good["body"])
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == good["answer"]["tokens"]
    assert lp["token_logprobs"] == pytest.approx(good["answer"]["token_logprobs"], abs=1e-5)


@pytest.mark.parametrize(("case", "build", "status", "message"), ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_bad_adapter_is_refused(case, build, status, message, good, model_sets, tmp_path):
    paths = model_sets["llama"]
    path = build(str(tmp_path / case), paths["flora-r2"], paths["base"])
    r = good["client"].post("/v1/load_lora_adapter", json={"lora_name": case, "lora_path": path})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"], r.text
    # Nothing was registered under that name: using it is a 404, like any unknown model.
    r = good["client"].post("/v1/completions", json={**good["body"], "model": case})
    assert r.status_code == 404, r.text
    _still_serving(good)


BAD_REQUESTS = [
    ("unknown-adapter", {"model": "no-such-adapter"}, 404),
    ("negative-max-tokens", {"max_tokens": -5}, 400),
    ("token-id-out-of-vocab", {"prompt": [1, 2, 10**7]}, 400),
    ("wrong-prompt-type", {"prompt": {"a": 1}}, 400),
    ("temperature-not-number", {"temperature": "hot"}, 400),
]


@pytest.mark.parametrize(("case", "change", "status"), BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused(case, change, status, good):
    r = good["client"].post("/v1/completions", json={**good["body"], **change})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"], r.text
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


def test_bad_static_adapter_fails_startup(model_sets, tmp_path):
    """A broken adapter in --lora-modules stops the server at start-up with the reason."""
    paths = dict(model_sets["llama"])
    bad = _edit_config(_copy(paths["flora-r1"], str(tmp_path / "bad")), r=16)
    paths["flora-r1"] = bad
    log = str(tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="exited"):
        serve(paths, 5, log).start(timeout=300)
    with open(log) as f:
        assert "--max-lora-rank 8" in f.read()


def test_flora_adapter_for_other_arch_is_refused(good, model_sets, tmp_path):
    """A StarCoder FLoRA adapter sent to the LLaMA server names modules the model lacks."""
    sc = model_sets["starcoder"]
    path = make_flora_adapter(sc["base"], str(tmp_path / "sc"), 1, ("c_fc",), 3)
    r = good["client"].post("/v1/load_lora_adapter", json={"lora_name": "sc", "lora_path": path})
    assert r.status_code == 400, r.text
    assert "'c_fc'" in r.json()["error"]["message"]
    _still_serving(good)
