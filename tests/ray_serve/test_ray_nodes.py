"""Ray Serve on a two-node cluster, one engine replica per node, and one node lost mid-run.

Two Ray nodes on this machine, on loopback only: `ray start --head` at 127.0.0.2 and a second
`ray start --address` at 127.0.0.3 (Ray rewrites 127.0.0.1 into the machine's outward IP, other
loopback addresses it keeps), each with its own ports and 1 CPU. Each engine replica reserves 1
CPU, so Serve must put one on each node. The second node joins only once the first replica, the
ingress and Serve's controller are placed on the head, so the node lost is one that holds an
engine replica and nothing else of the app (plus its own Serve proxy).

Checked: a mixed load (4 FLoRA adapters, a LoRA, the base model, both name forms `name` and
`base:name`) is served by both replicas with adapter affinity; the second node's raylet is
killed (SIGKILL) while a mixed load is in flight (half of it long generations, so both replicas
are busy); requests then fail fast or not at all (none hangs), and every answer that comes back
equals the dense reference (greedy token ids, log-probabilities to 1e-3); Ray marks the node
dead, the app's /flora/stats lists the survivor only, and Serve's status shows the deployment
UNHEALTHY with one replica running (its replacement waits for a CPU); later requests are all
answered, by the survivor, equal to the reference. Teardown kills this cluster's processes by
process group and by their raylet's pid (never `ray stop`) and checks none is left.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from reference import ask_logprobs, greedy, load_reference, token_logprobs

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,  # 5 minutes on 2 cores: two nodes, two engines started one after the other
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None,
        reason="needs the `ray` extra (ray[serve]==2.60.0)",
    ),
]

TOL = 1e-3  # log-probability, float32
MAX_TOKENS = 6
LONG = 48  # tokens of the long half of the load in flight at the kill
BASE = "base"
MODELS = (BASE, "flora-r1", "flora-r2", "flora-r4", "flora-r8", "lora-r8")
HEAD_IP, NODE_B_IP = "127.0.0.2", "127.0.0.3"
LLM_REPLICA = "SERVE_REPLICA::flora#FloraLLMServer"  # then `:<base>#<replica id>`
INGRESS_REPLICA = "SERVE_REPLICA::flora#FloraIngress#"
# For the `ray start` processes (GCS, raylets) and so every worker of this cluster. A SIGKILLed
# raylet refuses connections at once, so the GCS marks its node dead after 5 failed checks 1 s
# apart; the 5 s timeout keeps a busy (2-core) raylet from being declared dead by mistake.
NODE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "5",
    # A second raylet on a busy machine can wait longer than the default for its agent.
    "RAY_agent_register_timeout_ms": "120000",
}
CLIENT_TIMEOUT = 120.0  # s, per request: requests stuck on the lost node fail, never hang


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on every interface (all held until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait(what: str, ok: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = ok()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Node:
    name: str
    ip: str
    pgid: int  # `ray start`'s own session: GCS, raylet, agents (workers get their own groups)
    raylet_pid: int
    log: str


@dataclass
class Cluster:
    """Ray nodes started with `ray start` as separate sessions; torn down by process, never
    with `ray stop` (which stops every Ray process on the machine, other tests' too)."""

    temp_dir: str
    gcs_port: int = 0
    nodes: dict[str, Node] = field(default_factory=dict)  # name -> node that started
    started: list[Node] = field(default_factory=list)  # every attempt, for the teardown

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    def start(self, name: str, ip: str, attempts: int = 3) -> Node:
        """`ray start` a node; again if it fails (a raylet that does not register with the GCS
        within 30 s, fixed in Ray, is seen here on a busy machine), killing what it left."""
        for attempt in range(1, attempts + 1):
            node, ok = self._start_once(name, ip, attempt)
            if ok:
                return node
            self.kill(node)
            with open(node.log, errors="replace") as f:
                tail = f.read()[-3000:]
            if attempt == attempts:
                raise RuntimeError(f"`ray start` failed {attempts} times for node {name}:\n{tail}")
            print(f"\n`ray start` failed for node {name} (attempt {attempt}):\n{tail[-300:]}")
        raise AssertionError("unreachable")

    def _start_once(self, name: str, ip: str, attempt: int) -> tuple[Node, bool]:
        ports = _free_ports(9)
        head = not self.gcs_port
        args = ["--head", "--port", str(ports[0]), "--ray-client-server-port", str(ports[1]),
                "--include-dashboard", "false", "--dashboard-port", str(ports[2])] if head else [
                "--address", self.address]
        args += [
            "--node-ip-address", ip,
            "--num-cpus", "1",
            "--num-gpus", "0",
            "--object-store-memory", str(128 * 2**20),
            "--temp-dir", self.temp_dir,
            "--node-manager-port", str(ports[3]),
            "--object-manager-port", str(ports[4]),
            "--metrics-export-port", str(ports[5]),
            "--dashboard-agent-listen-port", str(ports[6]),
            "--dashboard-agent-grpc-port", str(ports[7]),
            "--runtime-env-agent-port", str(ports[8]),
            "--min-worker-port", "0",  # workers: ports the OS picks
            "--max-worker-port", "0",
            "--disable-usage-stats",
        ]
        log = os.path.join(self.temp_dir, f"ray-start-{name}-{attempt}.log")
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [ray_cli, "start", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **NODE_ENV}, start_new_session=True,
            )
        node = Node(name, ip, proc.pid, 0, log)
        self.started.append(node)  # torn down even if it fails to start
        try:
            ok = proc.wait(timeout=180) == 0
        except subprocess.TimeoutExpired:
            ok = False
        raylets = [p for p in self._group(node.pgid) if p.name() == "raylet"]
        node.raylet_pid = raylets[0].pid if raylets else 0
        if not ok and not head and raylets:
            # `ray start` gives a raylet 30 s to register (fixed in Ray): on a busy machine
            # it may still do so; the driver is connected by now and can see it.
            ok = self._registers_late(node, raylets[0], 60)
        if ok:
            assert len(raylets) == 1, raylets
            self.nodes[name] = node
            if head:
                self.gcs_port = ports[0]
        return node, ok

    @staticmethod
    def _registers_late(node: Node, raylet: Any, timeout: float) -> bool:
        import ray

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and raylet.is_running():
            if any(n["Alive"] and n["NodeManagerAddress"] == node.ip for n in ray.nodes()):
                print(f"\nnode {node.name}: `ray start` gave up, its raylet registered later")
                return True
            time.sleep(1)
        return False

    @staticmethod
    def _group(pgid: int) -> list[Any]:
        import psutil

        found = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == pgid:
                    found.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        return found

    def processes(self, node: Node) -> list[Any]:
        """The node's processes: its `ray start` session, every process its raylet started
        (workers carry RAY_RAYLET_PID; so do their children: vLLM's engine core), descendants."""
        import psutil

        found = {p.pid: p for p in self._group(node.pgid)}
        marker = f"RAY_RAYLET_PID={node.raylet_pid}"
        for p in psutil.process_iter():
            try:
                if p.pid not in found and marker in open(f"/proc/{p.pid}/environ").read().split(
                    "\0"
                ):
                    found[p.pid] = p
            except (OSError, psutil.Error):
                pass
        for p in list(found.values()):
            try:
                found |= {c.pid: c for c in p.children(recursive=True)}
            except psutil.Error:
                pass
        return list(found.values())

    def kill(self, node: Node) -> None:
        import psutil

        for _ in range(5):  # a dying process may still start children
            procs = self.processes(node)
            if not procs:
                return
            for p in procs:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=10)

    def stop(self) -> None:
        for node in reversed(self.started):
            self.kill(node)


@dataclass
class TwoNodeApp:
    cluster: Cluster
    url: str  # .../v1
    client: OpenAI
    refs: dict[str, Any]
    replica_node: dict[str, str]  # replica id -> node name
    node_ids: dict[str, str]  # node name -> Ray node id
    startup: str


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts sharing a prefix, of different lengths."""
    rng = random.Random(seed)
    prefix = [rng.randrange(2, 500) for _ in range(20)]
    return [prefix + [rng.randrange(2, 500) for _ in range(3 + 5 * i)] for i in range(n)]


Job = tuple[str, list[int], int]  # model name, token-id prompt, tokens to generate


def _ask(client: OpenAI, model: str, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    return ask_logprobs(client, model, prompt, n)


def _mixed(prompts: list[list[int]], seed: int, long: int = 0) -> list[Job]:
    """Every model on every prompt; adapters under both names, `name` and `base:name`; with
    `long`, every other job generates that many tokens instead of MAX_TOKENS."""
    jobs = [
        (name, p)
        for m in MODELS
        for p in prompts
        for name in ((m,) if m == BASE else (m, f"{BASE}:{m}"))
    ]
    out = [(name, p, long if long and i % 2 else MAX_TOKENS) for i, (name, p) in enumerate(jobs)]
    random.Random(seed).shuffle(out)
    return out


def _check(refs: dict[str, Any], jobs: list[Job], answers: list[Any]) -> float:
    """Every answer equals the dense reference; returns the worst |Δ logprob|."""
    worst = 0.0
    for (name, prompt, n), (toks, lps) in zip(jobs, answers, strict=True):
        ref = refs[name.removeprefix(f"{BASE}:")]
        assert toks == greedy(ref, prompt, n), f"{name}: tokens differ from reference"
        diff = max(abs(a - b) for a, b in zip(lps, token_logprobs(ref, prompt, toks), strict=True))
        assert diff <= TOL, f"{name}: |Δ logprob| {diff:.2e} > {TOL}"
        worst = max(worst, diff)
    return worst


def _stats(app: TwoNodeApp) -> dict[str, dict[str, Any]]:
    """/flora/stats, by replica id."""
    r = httpx.get(app.url.removesuffix("/v1") + "/flora/stats", timeout=CLIENT_TIMEOUT)
    r.raise_for_status()
    return {rep["replica"]: rep for rep in r.json()["replicas"]}


def _alive_actors(prefix: str) -> dict[str, str]:
    """Alive actors whose name starts with `prefix`: replica id -> node id."""
    from ray._private import state

    return {
        a["Name"].rsplit("#", 1)[1]: a["Address"]["NodeID"]
        for a in state.actors().values()
        if a["Name"].startswith(prefix) and a["State"] == "ALIVE"
    }


def _node_ids() -> dict[str, str]:
    """Alive Ray node id -> our node name, by node IP (a failed start may have left a dead
    node on the same IP)."""
    import ray

    names = {HEAD_IP: "a", NODE_B_IP: "b"}
    return {n["NodeID"]: names[n["NodeManagerAddress"]] for n in ray.nodes() if n["Alive"]}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeApp]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from flora_vllm import ray_serve
    from flora_vllm.ray_serve.app import deploy as deploy_app
    from flora_vllm.serving.server import free_port
    from flora_vllm.testing.tiny import build_demo_set

    paths = build_demo_set(str(tmp_path_factory.mktemp("ray_nodes") / "llama"), "llama")
    refs = {m: load_reference(paths["base"], None if m == BASE else paths[m]) for m in MODELS}
    cfg = ray_serve.FloraServeConfig(
        model=paths["base"],
        adapters={m: paths[m] for m in MODELS[1:]},
        served_model_name=BASE,
        replicas=2,
        device="cpu",
        cpus_per_replica=1.0,  # = each node's CPUs: one replica per node
        max_loras=2,
        adapters_per_replica=3,  # 5 adapters: the survivor alone must evict
        max_model_len=256,
        kv_cache_gib=1,
        engine_kwargs={"max_num_seqs": 32, "seed": 0},
        env={"HF_HUB_OFFLINE": "1"},
    )
    # Short: Unix socket paths under it must stay below 108 bytes.
    cluster = Cluster(tempfile.mkdtemp(prefix="flora-rn-"))
    set_up = False
    t0 = time.monotonic()
    try:
        cluster.start("a", HEAD_IP)
        t_head = time.monotonic() - t0
        ray.init(address=cluster.address, log_to_driver=False)
        deployed: dict[str, Any] = {}

        def deploy() -> None:
            try:
                deployed["url"] = deploy_app(cfg, "127.0.0.1", free_port())
            except BaseException as e:  # noqa: BLE001 -- re-raised in the test's thread
                deployed["error"] = e

        thread = threading.Thread(target=deploy, daemon=True)
        thread.start()
        # The head takes Serve's controller, the ingress and one replica (its only CPU); the
        # second replica waits for a CPU: the second node's.
        head_id = next(i for i, n in _node_ids().items() if n == "a")
        _wait(
            "the ingress and one engine replica on the head",
            lambda: "error" in deployed
            or (
                set(_alive_actors(INGRESS_REPLICA).values()) == {head_id}
                and set(_alive_actors(LLM_REPLICA).values()) == {head_id}
            ),
            300,
        )
        cluster.start("b", NODE_B_IP)
        t_b = time.monotonic() - t0
        thread.join(600)
        if "error" in deployed:
            raise deployed["error"]
        assert "url" in deployed, "the Serve app did not come up in 600 s"
        names = _node_ids()
        replica_node = {rid: names[nid] for rid, nid in _alive_actors(LLM_REPLICA).items()}
        assert sorted(replica_node.values()) == ["a", "b"], replica_node
        assert {names[n] for n in _alive_actors(INGRESS_REPLICA).values()} == {"a"}
        client = OpenAI(
            base_url=deployed["url"], api_key="unused", timeout=CLIENT_TIMEOUT, max_retries=0
        )
        startup = (
            f"head up {t_head:.0f}s, node b up {t_b:.0f}s, app with a replica on each node "
            f"{time.monotonic() - t0:.0f}s"
        )
        print(f"\n{startup}")
        node_ids = {n: i for i, n in names.items()}
        set_up = True
        yield TwoNodeApp(cluster, deployed["url"], client, refs, replica_node, node_ids, startup)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.stop()
            left = [p.pid for n in cluster.started for p in cluster.processes(n)]
            if set_up:  # else a setup error is on its way: do not hide it
                assert not left, f"processes of the test's Ray nodes left running: {left}"
            if not os.environ.get("FLORA_KEEP_RAY_TMP"):
                shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def test_node_lost_mid_run_survivor_answers(two_nodes: TwoNodeApp) -> None:
    import ray
    from ray import serve

    app = two_nodes
    t0 = time.monotonic()
    victim = next(r for r, n in app.replica_node.items() if n == "b")
    survivor = next(r for r, n in app.replica_node.items() if n == "a")

    # 1. Both replicas serve, each adapter goes back to the replica holding it.
    prompts = _prompts(4)
    for m in MODELS:  # one at a time: the router spreads new adapters over the replicas
        _ask(app.client, m, prompts[0], MAX_TOKENS)
    before = _stats(app)
    jobs = _mixed(prompts, seed=0)
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: _ask(app.client, *j), jobs))
    worst = _check(app.refs, jobs, answers)
    after = _stats(app)
    assert set(after) == {victim, survivor}, after.keys()
    served = {app.replica_node[r]: after[r]["requests"] - before[r]["requests"] for r in after}
    hits = sum(after[r]["affinity_hits"] - before[r]["affinity_hits"] for r in after)
    asked = sum(after[r]["adapter_requests"] - before[r]["adapter_requests"] for r in after)
    assert all(n > 0 for n in served.values()), f"a node's replica served nothing: {served}"
    assert hits / asked >= 0.8, f"affinity hit rate {hits / asked:.2f} < 0.8 ({hits}/{asked})"

    # 2. Node b's raylet dies while a mixed load is in flight: half of it generates LONG
    #    tokens, so when the first short answers are back, both replicas are still busy.
    node_b = app.cluster.nodes["b"]
    node_b_procs = app.cluster.processes(node_b)
    in_flight = _mixed(_prompts(2, seed=1), seed=1, long=LONG) * 2
    results: list[Any] = [None] * len(in_flight)

    def run(i: int) -> None:
        try:
            results[i] = _ask(app.client, *in_flight[i])
        except Exception as e:  # requests on the lost node (or through its proxy) may fail
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(in_flight))]
    for t in threads:
        t.start()
    _wait("3 answers", lambda: sum(r is not None for r in results) >= 3, 120, every=0.02)
    done_at_kill = sum(r is not None for r in results)
    os.kill(node_b.raylet_pid, signal.SIGKILL)
    t_kill = time.monotonic()
    assert done_at_kill < len(in_flight), "the load was over before the kill"
    for t in threads:
        t.join(CLIENT_TIMEOUT + 30)
    assert not any(t.is_alive() for t in threads), "a request outlived the client's timeout"
    failed = [r for r in results if isinstance(r, Exception)]
    # Each fails fast (within seconds of the node's death), as an HTTP error or a dropped
    # connection (through the lost node's own Serve proxy), never by hanging until timeout.
    assert all(
        isinstance(e, openai.APIStatusError | openai.APIConnectionError)
        and not isinstance(e, openai.APITimeoutError)
        for e in failed
    ), failed
    ok = [(j, r) for j, r in zip(in_flight, results, strict=True) if not isinstance(r, Exception)]
    worst = max(worst, _check(app.refs, [j for j, _ in ok], [r for _, r in ok]))
    t_settled = time.monotonic() - t_kill

    # 3. The app reports the loss: Ray marks the node dead, /flora/stats lists the survivor
    #    only, Serve runs one replica of the two it wants (the other has no CPU to start on).
    node_b_id = app.node_ids["b"]
    _wait(
        "node b marked dead",
        lambda: any(n["NodeID"] == node_b_id and not n["Alive"] for n in ray.nodes()),
        60,
    )
    t_node_dead = time.monotonic() - t_kill
    stats = _wait("/flora/stats without the lost replica", lambda: (
        s if set(s := _stats(app)) == {survivor} else None), 120)
    t_dropped = time.monotonic() - t_kill

    def engine_status() -> Any:
        deployments = serve.status().applications["flora"].deployments
        return next(d for name, d in deployments.items() if name.startswith("FloraLLMServer"))

    # Serve's controller learns of it later than the ingress's router (seconds).
    def lost_shown() -> Any:
        s = engine_status()
        return s if s.replica_states.get("RUNNING") == 1 and s.status != "HEALTHY" else None

    status = _wait("Serve's status to show the lost replica", lost_shown, 90)
    t_serve = time.monotonic() - t_kill

    # 4. Later requests: all answered, by the survivor, equal to the reference.
    later = _mixed(_prompts(2, seed=2), seed=2)
    fresh = OpenAI(base_url=app.url, api_key="unused", timeout=CLIENT_TIMEOUT, max_retries=0)
    with ThreadPoolExecutor(len(later)) as pool:
        answers = list(pool.map(lambda j: _ask(fresh, *j), later))
    worst = max(worst, _check(app.refs, later, answers))
    now = _stats(app)
    assert set(now) == {survivor}, now.keys()
    assert now[survivor]["requests"] - stats[survivor]["requests"] == len(later)

    # What of node b outlives its raylet: Ray's workers exit when it is gone; report the rest
    # (the teardown kills them).
    def leftovers() -> list[str]:
        import psutil

        alive = []
        for p in node_b_procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(os.path.basename(a) for a in p.cmdline()[:3]))
            except psutil.Error:
                pass
        return alive

    t_left = time.monotonic()
    try:
        _wait("node b's processes to exit", lambda: not leftovers(), 20)
    except AssertionError:
        pass
    left = leftovers()
    t_left = time.monotonic() - t_left
    kinds = sorted({f"{type(e).__name__}" for e in failed})
    pairs = zip(in_flight, results, strict=True)
    failed_long = sum(isinstance(r, Exception) and j[2] == LONG for j, r in pairs)
    print(
        f"\n{app.startup}; test {time.monotonic() - t0:.0f}s\n"
        f"served before the kill (per node): {served}, affinity {hits}/{asked}\n"
        f"killed node b's raylet with {done_at_kill}/{len(in_flight)} answered: "
        f"{len(failed)} failed ({failed_long} of them long) {kinds}, {len(ok)} answered "
        f"correctly; all back "
        f"{t_settled:.1f}s after the kill, node dead at {t_node_dead:.1f}s, /flora/stats "
        f"without it at {t_dropped:.1f}s, Serve's status at {t_serve:.1f}s\n"
        f"Serve: {status.status} {dict(status.replica_states)} {status.message!r}\n"
        f"later: {len(later)}/{len(later)} answered by the survivor; max |Δ logprob| "
        f"{worst:.2e}; node b processes alive {t_left:.0f}s after the wave: {left}"
    )
