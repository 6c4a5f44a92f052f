"""The vLLM hooks: loud failure on a vLLM drift, stock vLLM refusing FLoRA folders, and the
CPU LoRA ops no longer leaking the last slot's adapter into tokens that have none."""

from __future__ import annotations

import pytest
import torch

from flora_vllm import hooks
from flora_vllm.hooks import api_metrics, worker_step
from flora_vllm.testing.tiny import make_flora_adapter

pytestmark = pytest.mark.line  # also run on the other vLLM line (`make test-line`)


def test_version_drift_fails_loudly(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.35.1")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.29\.0, .*0\.34\.0, found 0\.35\.1"):
        hooks.check_vllm()


def test_missing_hook_target_fails_loudly(monkeypatch):
    monkeypatch.setattr(hooks, "HOOKS", (*hooks.HOOKS, hooks.Hook("vllm.lora.utils", "_gone")))
    with pytest.raises(RuntimeError, match=r"vllm\.lora\.utils\._gone is missing"):
        hooks.check_vllm()


def test_pinned_vllm_has_every_target():
    hooks.check_vllm()


def test_stock_vllm_refuses_a_flora_folder(model_sets, tmp_path):
    """Without the plugin vLLM must fail loudly, never apply FLoRA factors as additive LoRA."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    path = make_flora_adapter(model_sets["llama"]["base"], str(tmp_path / "f"), 2, ("q_proj",), 0)
    with pytest.raises(ValueError, match="lora_alpha"):
        PEFTHelper.from_local_dir(path, None)
    helper = PEFTHelper(r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="doesn't contain tensors"):
        LoRAModel.from_local_checkpoint(path, {"q_proj"}, helper, device="cpu")


def test_cpu_lora_ops_skip_tokens_without_adapter():
    from vllm.lora.ops.torch_ops import lora_ops

    stock = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    x = torch.ones(3, 4)
    lora_a = torch.randn(2, 1, 5, 4)  # [slots, 1, rank, in]
    idx = torch.tensor([0, -1, 1])
    leaked = torch.zeros(3, 5)
    stock(x, lora_a, leaked, idx, 1.0)
    # The upstream defect this guards against: slot -1 reads the last slot's weights.
    torch.testing.assert_close(leaked[1], leaked[2])
    fixed = torch.zeros(3, 5)
    worker_step._skip_unadapted_tokens(stock)(x, lora_a, fixed, idx, 1.0)
    torch.testing.assert_close(fixed[1], torch.zeros(5))
    torch.testing.assert_close(fixed[[0, 2]], leaked[[0, 2]])


def test_cpu_lora_ops_keep_nan_of_a_slot_out_of_unadapted_rows():
    """A token without adapter must not compute 0 × (a NaN adapter's weight) = NaN."""
    from vllm.lora.ops.torch_ops import lora_ops

    stock = getattr(lora_ops.bgmv_expand, "__wrapped__", lora_ops.bgmv_expand)
    masked = worker_step._skip_unadapted_tokens(stock)
    lora_b = torch.randn(2, 1, 5, 3)  # [slots, 1, out, rank]
    lora_b[0, 0, 2, 1] = float("nan")  # slot 0: an adapter whose weights overflowed
    y = torch.arange(15.0).view(3, 5)
    masked(torch.ones(3, 3), lora_b, y, torch.tensor([1, -1, 1]), add_inputs=True)
    torch.testing.assert_close(y[1], torch.arange(5.0, 10.0))  # untouched, finite
    assert bool(torch.isfinite(y).all())


def test_cpu_lora_ops_survive_prompt_logprobs_rows():
    """vLLM's prompt-logprobs call: one request's N prompt rows with the batch's B per-request
    indices. One request: its adapter on every row; several: no LoRA (not a crash)."""
    from vllm.lora.ops.torch_ops import lora_ops

    stock = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    masked = worker_step._skip_unadapted_tokens(stock)
    x, lora_a = torch.randn(7, 4), torch.randn(2, 1, 3, 4)
    one = torch.zeros(7, 3)
    masked(x, lora_a, one, torch.tensor([1]), 1.0)
    torch.testing.assert_close(one, x @ lora_a[1, 0].T)
    several = torch.full((7, 3), 5.0)
    masked(x, lora_a, several, torch.tensor([0, 1]), 1.0)
    torch.testing.assert_close(several, torch.full((7, 3), 5.0))


class _Records(list):
    """Log records of the flora_vllm logger (it may not propagate to the root logger)."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("flora_vllm")
        self.saved = (self.logger.level, self.logger.disabled)
        self.logger.setLevel(logging.DEBUG)  # whatever an earlier test's logging config left
        self.logger.disabled = False
        self.handler = logging.Handler()
        self.handler.emit = self.append
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.disabled = self.saved[1]


def _no_hooks(monkeypatch):
    def forbidden():
        raise AssertionError("the plugin changed vLLM")

    monkeypatch.setattr(hooks, "apply_hooks", forbidden)


def test_plugin_leaves_another_vllm_untouched(monkeypatch):
    """Installed next to any other vLLM, the plugin must not stop vLLM servers from starting."""
    import vllm

    from flora_vllm import plugin

    monkeypatch.setattr(vllm, "__version__", "0.35.1")
    monkeypatch.delenv("FLORA_DISABLE", raising=False)
    _no_hooks(monkeypatch)
    with _Records() as records:
        plugin.register()  # no exception
    errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
    assert errors and "0.29.0" in errors[0] and "0.35.1" in errors[0], errors


def test_flora_disable_switches_the_plugin_off(monkeypatch):
    from flora_vllm import plugin

    monkeypatch.setenv("FLORA_DISABLE", "1")
    _no_hooks(monkeypatch)
    with _Records() as records:
        plugin.register()
    assert any("FLORA_DISABLE=1" in r.getMessage() for r in records)


def test_flora_vllm_serve_refuses_another_vllm(monkeypatch):
    """Who asked for FLoRA explicitly gets the loud failure, before vLLM starts."""
    import os

    import vllm

    from flora_vllm.serving import server

    monkeypatch.setattr(vllm, "__version__", "0.35.1")
    monkeypatch.delenv("FLORA_DISABLE", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("vLLM was started"))
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.29\.0, .*0\.34\.0, found 0\.35\.1"):
        server.exec_server(["--model", "m"])


def test_metrics_scrape_survives_unreadable_gauges(monkeypatch):
    """A live gauge that cannot be read this scrape leaves /metrics serving the rest, logged
    once per kind, not a 500 per scrape."""
    import asyncio

    from flora_vllm.serving import metrics

    class BrokenEngine:
        @property
        def output_processor(self):
            raise RuntimeError("engine client without an output processor")

        async def collective_rpc(self, *args, **kwargs):
            raise TimeoutError("engine busy")

    metrics.set_live_state({("a", "flora"): 2}, [("a", "flora", "device")])
    monkeypatch.setattr(api_metrics, "_warned", set())
    models = type("Models", (), {"lora_requests": {}})()
    with _Records() as records:
        for _ in range(3):  # three scrapes
            asyncio.run(api_metrics.refresh_live_gauges(BrokenEngine(), models))
    warnings = [r.getMessage() for r in records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings  # in-flight once, residency once
    text = metrics.render({"": metrics.snapshot()})
    assert 'adapter="a"' in text  # the gauges read last time are still served


def test_load_failures_are_told_apart_by_error_class():
    """The class decides the status; across vLLM's process boundaries (where only text passes)
    the class is recognised by its prefix right after vLLM's hop wrappers, nowhere else."""
    from flora_vllm.adapter import AdapterResourcesError, FLoRAAdapterError
    from flora_vllm.hooks.api_server import LOAD_ERRORS, VLLM_FAILURE_WRAPPERS, load_failure

    core, worker = VLLM_FAILURE_WRAPPERS

    invalid = FLoRAAdapterError("'a' (/p)", ["RuntimeError: shapes"])
    oom = AdapterResourcesError("'a' (/p)", MemoryError("no room"))
    assert load_failure(invalid) is FLoRAAdapterError
    assert load_failure(oom) is AdapterResourcesError
    assert load_failure(core + str(invalid)) is FLoRAAdapterError
    assert load_failure(core + worker + str(oom) + "', please check ...") is AdapterResourcesError
    assert load_failure(worker + str(invalid)) is FLoRAAdapterError
    assert LOAD_ERRORS[FLoRAAdapterError][0] == 400 and LOAD_ERRORS[AdapterResourcesError][0] == 503
    for other in (
        core + worker + "KeyError: 'Invalid adapter' is not a module",  # the words elsewhere
        "Loading lora Invalid adapter x failed",
        RuntimeError("CUDA error: an illegal memory access"),
    ):
        assert load_failure(other) is None, other


def test_per_name_locks_live_only_while_in_use():
    """10,000 distinct names locked one after another leave no lock behind; two tasks on one
    name still exclude each other (they meet on the same lock)."""
    import asyncio
    import collections

    from flora_vllm.hooks.api_server import LockTable, _bounded_locks

    async def main() -> None:
        models = type("Models", (), {})()
        models.lora_resolver_lock = collections.defaultdict(asyncio.Lock)
        held = models.lora_resolver_lock["kept"]
        _bounded_locks(models)
        table = models.lora_resolver_lock
        assert isinstance(table, LockTable) and table["kept"] is held
        for i in range(10_000):
            async with table[f"nobody-{i}"]:
                pass
        del held
        assert len(table) == 0
        inside, order = 0, []

        async def worker(k: int) -> None:
            nonlocal inside
            async with table["same"]:
                inside += 1
                assert inside == 1
                await asyncio.sleep(0)
                order.append(k)
                inside -= 1

        await asyncio.gather(*(worker(k) for k in range(5)))
        assert sorted(order) == list(range(5)) and len(table) == 0

    asyncio.run(main())


def test_lora_requests_info_keeps_one_series_with_capped_names():
    """vLLM's `vllm:lora_requests_info` is labelled with the comma-joined running and waiting
    adapter names: stock, every combination ever seen stays a series. Hooked: one series, each
    name list sorted and cut at LORA_INFO_NAMES."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    stock = Gauge("vllm:lora_requests_info", "info",
                  ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                  registry=registry)
    gauge = api_metrics.LatestSeriesGauge(stock)
    names = [f"tenant-{i:03d}" for i in range(300)]
    for step in range(50):  # 50 steps, each with other running / waiting adapters
        running = ",".join(names[step : step + 40])
        gauge.labels(max_lora=4, waiting_lora_adapters="", running_lora_adapters=running)
        gauge.labels(
            max_lora=4, waiting_lora_adapters=names[step], running_lora_adapters=running
        ).set_to_current_time()
    samples = [s for m in registry.collect() for s in m.samples]
    assert len(samples) == 1
    running = samples[0].labels["running_lora_adapters"].split(",")
    assert running == sorted(names[49 : 49 + 40])[: api_metrics.LORA_INFO_NAMES] + ["+24 more"]
    assert samples[0].labels["waiting_lora_adapters"] == names[49]
