"""The adapter format: a write/read round trip, and every problem of a folder reported at once."""

from __future__ import annotations

import json

import pytest
import torch

from flora_vllm.adapter import (
    FLoRAAdapterConfig,
    FLoRAAdapterError,
    FLoRAAdapterNotFoundError,
    load_adapter,
    save_adapter,
)

SHAPES = {"m.layers.0.q_proj": (6, 4), "m.layers.0.up_proj": (10, 4)}


def _factors(r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {p: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g))
            for p, (o, i) in SHAPES.items()}


def test_round_trip_folds_alpha_over_r_into_b(tmp_path):
    factors = _factors(3)
    save_adapter(str(tmp_path), factors, r=3, flora_alpha=6.0, base_model_name_or_path="m")
    cfg, weights = load_adapter(str(tmp_path), SHAPES, max_rank=8)
    assert (cfg.r, cfg.flora_alpha, sorted(cfg.target_modules)) == (3, 6.0, ["q_proj", "up_proj"])
    for path, (a, b) in factors.items():
        torch.testing.assert_close(weights[path].a, a)
        torch.testing.assert_close(weights[path].b, b * 2.0)  # 6 / 3


def test_flora_rank_limit_is_named_in_the_refusal(tmp_path):
    save_adapter(str(tmp_path), _factors(2), r=2)
    with pytest.raises(FLoRAAdapterError,
                       match=r"rank 2 > FLORA_MAX_RANK=1; .* FLORA_MAX_RANK >= 2"):
        load_adapter(str(tmp_path), SHAPES, max_rank=1, rank_setting="FLORA_MAX_RANK=1")


def test_all_problems_are_reported_together(tmp_path):
    factors = _factors(2)
    factors["m.layers.0.q_proj"] = (torch.ones(2, 5), torch.full((6, 2), float("nan")))
    save_adapter(str(tmp_path), factors, r=2)
    with pytest.raises(FLoRAAdapterError) as e:
        load_adapter(str(tmp_path), SHAPES, max_rank=1)
    msg = str(e.value)
    assert len(e.value.problems) == 3, msg
    assert "rank 2 > --max-lora-rank 1" in msg and "--max-lora-rank >= 2" in msg
    assert "flora_A has shape [2, 5], expected [2, 4]" in msg
    assert "flora_B holds NaN or inf" in msg


def test_targeted_module_without_weights_is_refused(tmp_path):
    """No target module may be silently left unadapted."""
    factors = _factors(1)
    del factors["m.layers.0.up_proj"]
    save_adapter(str(tmp_path), factors, r=1)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "up_proj"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FLoRAAdapterError, match="up_proj' is targeted but flora_A/B is missing"):
        load_adapter(str(tmp_path), SHAPES)


def test_missing_folder_is_not_found(tmp_path):
    with pytest.raises(FLoRAAdapterNotFoundError):
        load_adapter(str(tmp_path / "absent"), SHAPES)


CONFIG_ERRORS = [
    ({"peft_type": "LORA"}, "peft_type is 'LORA'"),
    ({"r": 0}, "positive integer"),
    ({"r": 2.5}, "positive integer"),
    ({"r": True}, "positive integer"),
    ({"flora_alpha": "big"}, "flora_alpha"),
    ({"flora_alpha": float("inf")}, "flora_alpha"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": [3]}, "target_modules"),
    ({"base_model_name_or_path": 7}, "base_model_name_or_path"),
]


@pytest.mark.parametrize(("change", "message"), CONFIG_ERRORS)
def test_config_errors(change, message):
    raw = {"peft_type": "FLORA", "r": 2, "flora_alpha": 1.0, "target_modules": ["q_proj"]}
    with pytest.raises(FLoRAAdapterError, match="1 problem") as e:
        FLoRAAdapterConfig.from_dict({**raw, **change}, "a")
    assert message in str(e.value)


def test_a_header_claiming_a_huge_tensor_is_refused_unread(tmp_path):
    """A crafted safetensors header (an 8 GB tensor over a sparse file) is refused from the
    header alone, before anything is read or allocated."""
    save_adapter(str(tmp_path), _factors(2), r=2)
    n = 45_000  # 8 GB: mmap-able, and what a reader without the check would allocate
    header = json.dumps({
        "base_model.model.m.layers.0.q_proj.flora_A.weight":
            {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]},
    }).encode()
    with open(tmp_path / "flora_model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * n * n)  # sparse: no disk space used
    with pytest.raises(FLoRAAdapterError, match=r"larger than any factor .* not read"):
        load_adapter(str(tmp_path), SHAPES, max_rank=8)


def test_stray_tensors_are_refused_from_the_header_unread(tmp_path, monkeypatch):
    """A file with many stray tensors is refused by name before any stray one is read."""
    from safetensors.torch import load_file, save_file

    from flora_vllm.adapter import load as adapter

    save_adapter(str(tmp_path), _factors(1), r=1)
    path = tmp_path / adapter.WEIGHTS_NAME
    tensors = load_file(str(path))
    stray = {f"base_model.model.junk.{i}.weight": torch.zeros(4) for i in range(200)}
    stray["base_model.model.m.layers.0.k_proj.flora_A.weight"] = torch.ones(1, 4)  # not adaptable
    save_file({**tensors, **stray}, str(path))
    read: list[str] = []
    real_open = adapter.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            inner = self.handle.__enter__()
            outer = self

            class View:
                def keys(self):
                    return inner.keys()

                def get_slice(self, k):
                    return inner.get_slice(k)

                def get_tensor(self, k):
                    read.append(k)
                    return inner.get_tensor(k)

            outer.view = View()
            return outer.view

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(adapter, "safe_open", Counting)
    with pytest.raises(FLoRAAdapterError) as e:
        load_adapter(str(tmp_path), SHAPES, max_rank=8)
    assert "unexpected tensor 'base_model.model.junk.0.weight'" in str(e.value)
    assert "'m.layers.0.k_proj' is not an adaptable linear module" in str(e.value)
    assert sorted(read) == sorted(tensors), "a stray tensor was read"


def test_lora_header_check_finds_every_problem_without_reading_tensors(tmp_path):
    """PEFT LoRA weights checked from the header alone: a module without lora_B, an A narrower
    than its layer, B's rank apart from A's, a declared size over the limit; a good file and
    tensors of modules the check does not know pass (vLLM's loader has those)."""
    from safetensors.torch import save_file

    from flora_vllm.adapter.lora import LORA_WEIGHTS, lora_problems

    shapes = {"m.q": (64, 32), "m.k": (16, 32), "m.o": (32, 64)}

    def check(tensors: dict[str, torch.Tensor], limit: int = 2**20) -> list[str]:
        save_file(tensors, str(tmp_path / LORA_WEIGHTS))
        return lora_problems(str(tmp_path), shapes, limit)

    key = "base_model.model.{}.lora_{}.weight".format
    good = {key("m.q", "A"): torch.ones(4, 32), key("m.q", "B"): torch.ones(64, 4),
            key("lm_head", "A"): torch.ones(4, 7), key("lm_head", "B"): torch.ones(9, 4)}
    assert check(good) == []
    bad = {key("m.q", "A"): torch.ones(4, 32),  # no B
           key("m.k", "A"): torch.ones(4, 20), key("m.k", "B"): torch.ones(16, 4),  # narrow A
           key("m.o", "A"): torch.ones(4, 64), key("m.o", "B"): torch.ones(32, 2)}  # rank apart
    problems = check(bad)
    assert sorted(problems) == [
        "m.k.lora_A has shape [4, 20], expected [r, 32]",
        "m.o.lora_B has shape [32, 2], expected [32, 4]",
        "module 'm.q' has lora_A but no lora_B (every adapted module needs both)",
    ], problems
    (over,) = check(good, limit=1000)
    assert "over this server's limit" in over and "FLORA_MAX_ADAPTER_MB" in over
    (tmp_path / LORA_WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert "not a readable safetensors file" in lora_problems(str(tmp_path), shapes, 2**20)[0]


def test_folder_check_refuses_what_is_not_a_file_without_opening_it(tmp_path):
    """A FIFO (opening it blocks), a broken symlink; a regular folder with a subfolder passes."""
    import os

    from flora_vllm.adapter import folder_problems, read_peft_type

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.bin").write_bytes(b"x")
    assert folder_problems(str(tmp_path)) == []
    os.mkfifo(tmp_path / "adapter_config.json")
    os.symlink("/nonexistent", tmp_path / "gone")
    assert sorted(folder_problems(str(tmp_path))) == [
        "'adapter_config.json' is a named pipe (FIFO), not a regular file",
        "'gone' is a broken symlink",
    ]
    assert read_peft_type(str(tmp_path)) is None  # returns at once: the pipe is never opened


# --- the API server's copy of a folder (what the worker reads) ---------------------------------


def _folder(tmp_path, files: dict[str, bytes]) -> str:
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return str(src)


def test_copy_is_byte_identical_and_independent_of_the_folder(tmp_path):
    from flora_vllm.adapter.snapshot import copy_adapter

    src = _folder(tmp_path, {"adapter_config.json": b"{}", "w.safetensors": b"x" * 5000,
                             "sub/extra.json": b"[]"})
    (tmp_path / "copies").mkdir()
    copy = copy_adapter(src, str(tmp_path / "copies"), 10_000)
    for rel in ("adapter_config.json", "w.safetensors", "sub/extra.json"):
        assert open(f"{copy}/{rel}", "rb").read() == (tmp_path / "src" / rel).read_bytes()
    (tmp_path / "src" / "w.safetensors").write_bytes(b"y")  # rewritten in place
    assert open(f"{copy}/w.safetensors", "rb").read() == b"x" * 5000  # the copy keeps its bytes


def test_copy_refuses_what_is_too_large_before_reading_it(tmp_path, monkeypatch):
    from flora_vllm.adapter import snapshot

    src = _folder(tmp_path, {"adapter_config.json": b"{}"})
    with open(f"{src}/huge.safetensors", "wb") as f:
        f.truncate(5 * 2**30)  # sparse: a reader that trusted it would read 5 GiB
    reads = []
    monkeypatch.setattr(snapshot.os, "read", lambda fd, n: reads.append(n) or b"")
    (tmp_path / "copies").mkdir()
    with pytest.raises(FLoRAAdapterError, match="FLORA_MAX_ADAPTER_MB") as e:
        snapshot.copy_adapter(src, str(tmp_path / "copies"), 2**20)
    assert "'huge.safetensors' holds 5368709120 bytes" in str(e.value)
    assert len(reads) <= 1  # at most the small config was read; nothing of the huge file
    assert list((tmp_path / "copies").iterdir()) == []  # nothing left behind


def test_copy_never_blocks_on_a_fifo_swapped_in_after_the_check(tmp_path):
    """The folder check stats entries; a FIFO put there after it would block a plain open().
    The copy opens without blocking and refuses what is not a regular file once open."""
    import os

    from flora_vllm.adapter.snapshot import _copy_file

    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        _copy_file(str(fifo), str(tmp_path / "out"), 2**20)  # would hang forever if it blocked
    assert not (tmp_path / "out").exists()


def test_copy_refuses_files_linking_outside_the_roots(tmp_path):
    import os

    from flora_vllm.adapter.snapshot import copy_adapter

    (tmp_path / "secret").write_bytes(b"s")
    src = _folder(tmp_path, {"adapter_config.json": b"{}"})
    os.symlink(tmp_path / "secret", f"{src}/w.safetensors")
    (tmp_path / "copies").mkdir()
    with pytest.raises(FLoRAAdapterError, match="'w.safetensors' resolves outside"):
        copy_adapter(src, str(tmp_path / "copies"), 2**20, roots=(src,))
    assert copy_adapter(src, str(tmp_path / "copies"), 2**20)  # no roots: anything goes


def test_a_folder_nested_past_the_recursion_limit_is_refused_not_crashed(tmp_path):
    """1,500 nested folders: os.walk (recursive) raised RecursionError, a 500 in the API
    server; the walk is iterative and stops at MAX_DEPTH levels."""
    import os
    import subprocess

    from flora_vllm.adapter.files import folder_problems
    from flora_vllm.adapter.snapshot import copy_adapter

    src = tmp_path / "deep"
    path = str(src)
    os.mkdir(path)
    try:
        for _ in range(1500):
            path = os.path.join(path, "a")
            os.mkdir(path)
        assert folder_problems(str(src)) == ["the folder nests folders more than 8 deep"]
        (tmp_path / "copies").mkdir()
        with pytest.raises(FLoRAAdapterError, match="more than 8 deep"):
            copy_adapter(str(src), str(tmp_path / "copies"), 2**20)
        assert os.listdir(tmp_path / "copies") == []
    finally:  # pytest's own cleanup of old temp folders recurses: remove it here
        subprocess.run(["rm", "-rf", str(src)], check=True)
