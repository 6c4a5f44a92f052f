"""`flora_vllm.ray_serve._private`: the Ray internals the Ray Serve app uses are checked against
the pinned Ray, every problem named (no Ray cluster: imports only)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None,
        reason="needs the `ray` extra (ray[serve]==2.60.0)",
    ),
]


def test_installed_ray_has_every_target() -> None:
    from flora_vllm.ray_serve import _private

    assert _private.ray_problems() == []
    _private.check_ray()  # does not raise


def test_another_ray_version_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from flora_vllm.ray_serve import _private

    monkeypatch.setattr(ray, "__version__", "2.99.0")
    problems = _private.ray_problems()
    assert len(problems) == 1, problems
    assert "2.60.0" in problems[0] and "2.99.0" in problems[0]
    with pytest.raises(RuntimeError, match="supports Ray 2.60.0, found 2.99.0"):
        _private.check_ray()


def test_a_missing_target_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from flora_vllm.ray_serve import _private

    targets = list(_private.RAY_TARGETS)
    targets[0] = ("ray.serve.llm.deployment", "LLMServer._no_such_method")
    targets[1] = ("ray.llm._internal.no_such_module", "anything")
    monkeypatch.setattr(_private, "RAY_TARGETS", tuple(targets))
    problems = _private.ray_problems()
    assert len(problems) == 2, problems
    assert "ray.serve.llm.deployment.LLMServer._no_such_method" in problems[0]
    assert "ray.llm._internal.no_such_module.anything" in problems[1]
    with pytest.raises(RuntimeError) as err:
        _private.check_ray()
    assert "LLMServer._no_such_method" in str(err.value)
    assert "no_such_module.anything" in str(err.value)


def test_a_vllm_ray_serve_cannot_run_on_is_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM 0.33+ lost the module Ray 2.60's Serve LLM imports: refused at start, naming the
    releases it runs on and the commands that install one."""
    import vllm

    from flora_vllm.ray_serve import _private

    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    problems = _private.ray_problems()
    assert "found 0.34.0" in problems[0] and "cli_args" in problems[0]
    assert "make setup VLLM=0.29" in problems[0] and "0.32.0" in problems[0]
    with pytest.raises(RuntimeError, match="Serve LLM runs on vLLM 0.29.0"):
        _private.check_ray()
    monkeypatch.setattr(vllm, "__version__", "0.29.0")
    assert _private.vllm_for_ray_problems(vllm.__version__) == []


def test_ray_serve_llm_engine_imports_on_the_installed_vllm() -> None:
    """Ray's vLLM engine module (what the replicas run) imports next to the installed vLLM."""
    import importlib

    importlib.import_module("ray.llm._internal.serve.engines.vllm.vllm_engine")
    importlib.import_module("ray.serve.llm")
