"""A two-node Ray cluster on one host, on loopback addresses only.

The tests and the benchmark need a real multi-node Ray cluster (two raylets, so Ray places the
two tensor-parallel workers on different nodes and vLLM talks to the second one over TCP) on a
machine whose only network is loopback, next to other people's Ray clusters.  So:

* each node is a ``ray start --block`` in its own session: stopping the cluster kills exactly
  those process groups (never ``ray stop``, which kills every Ray process of the machine);
* node ``i`` lives on ``127.0.0.(i+1)`` with every port given explicitly, from a block of
  ports that was free when the cluster was made;
* ``ray start`` rewrites ``127.0.0.1`` to the host's outward address
  (``ray._private.services.resolve_ip_for_localhost``).  The head and the drivers run with
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which keeps them on 127.0.0.1, but a non-head
  ``ray start`` refuses to run with it; the second node is therefore started through
  :mod:`vllm_twotower.multinode.loopback_start`, which makes that rewrite the identity.

Real clusters need none of this: see ``docs/multinode.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_twotower.multinode import RESOURCE_ENV

NODE_IPS = ("127.0.0.1", "127.0.0.2")
#: Ports each node needs: 6 named ones, then its worker port range.
_NODE_PORTS = 6
_WORKER_PORTS = 12
_HEAD_PORTS = 3  # GCS, Ray client server, dashboard
_BLOCK = _HEAD_PORTS + len(NODE_IPS) * (_NODE_PORTS + _WORKER_PORTS)
_STARTED = "Ray runtime started."


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(size: int = _BLOCK, start: int = 20000, stop: int = 60000) -> int:
    """The first port of ``size`` consecutive ports that are free now (pid-seeded search)."""
    span = stop - start - size
    first = start + (os.getpid() * 7919) % span
    for offset in range(0, span, size):
        base = start + (first - start + offset) % span
        if all(_port_is_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports in [{start}, {stop})")


@dataclass
class LoopbackCluster:
    """Two Ray nodes on 127.0.0.1 and 127.0.0.2, each offering ``units`` of ``resource``.

    ``node_env[i]`` is added to node ``i``'s environment (and so to every Ray worker started
    there), ``env`` to both; the caller's drivers use :meth:`driver_env`.
    """

    resource: str
    temp_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    node_env: Sequence[Mapping[str, str]] = ({}, {})
    units: int = 1
    num_cpus: int = 2
    port_base: int = 0
    _procs: list[subprocess.Popen] = field(default_factory=list, init=False)

    @property
    def address(self) -> str:
        return f"{NODE_IPS[0]}:{self.port_base}"

    def driver_env(self) -> dict[str, str]:
        """Variables a driver (``LLM``, ``vllm serve``) on the head node needs."""
        return {
            "RAY_ADDRESS": self.address,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "VLLM_HOST_IP": NODE_IPS[0],
            **self.env,
            **self.node_env[0],
        }

    def _ports(self, node: int) -> list[str]:
        base = self.port_base + _HEAD_PORTS + node * (_NODE_PORTS + _WORKER_PORTS)
        names = ["node-manager", "object-manager", "dashboard-agent-listen",
                 "dashboard-agent-grpc", "metrics-export", "runtime-env-agent"]  # fmt: skip
        flags = [f"--{name}-port={base + i}" for i, name in enumerate(names)]
        low = base + _NODE_PORTS
        return [*flags, f"--min-worker-port={low}", f"--max-worker-port={low + _WORKER_PORTS - 1}"]

    def _command(self, node: int) -> list[str]:
        common = [
            f"--node-ip-address={NODE_IPS[node]}",
            f"--resources={json.dumps({self.resource: self.units})}",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            "--block",
            *self._ports(node),
        ]
        if node == 0:
            head = [
                f"--port={self.port_base}",
                f"--ray-client-server-port={self.port_base + 1}",
                f"--dashboard-port={self.port_base + 2}",
                "--include-dashboard=false",
            ]
            return [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", *head, *common]
        module = "vllm_twotower.multinode.loopback_start"
        return [sys.executable, "-m", module, f"--address={self.address}", *common]

    def _node_environment(self, node: int) -> dict[str, str]:
        env = {**os.environ, **self.env, **self.node_env[node], "VLLM_HOST_IP": NODE_IPS[node]}
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0" if node == 0 else "1"
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, timeout_s: float = 180, attempts: int = 3) -> None:
        """Start both nodes, head first; each is up once ``ray start`` says so.

        A node gets ``attempts`` tries: ``ray start`` gives a raylet a fixed 30 s to register
        with the head, which a 2-core machine under load sometimes misses.
        """
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        if not self.port_base:
            self.port_base = free_port_block()
        for node in range(len(NODE_IPS)):
            for attempt in range(attempts):
                log = self.temp_dir / f"node{node}-{attempt}.log"
                proc = self._launch(node, log)
                if self._started(proc, log, timeout_s):
                    self._procs.append(proc)
                    break
                _kill_group(proc)
                if attempt == attempts - 1:
                    raise RuntimeError(f"ray start failed:\n{log.read_text()[-4000:]}")

    def _launch(self, node: int, log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(
                self._command(node),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._node_environment(node),
                start_new_session=True,  # its own process group: stop() kills exactly it
            )

    @staticmethod
    def _started(proc: subprocess.Popen, log: Path, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while _STARTED not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def processes(self, node: int, name: str) -> list[int]:
        """Pids of node ``node``'s processes whose name contains ``name`` (``RayWorkerProc``)."""
        import psutil

        children = psutil.Process(self._procs[node].pid).children(recursive=True)
        return [p.pid for p in children if name in p.name() or name in " ".join(p.cmdline())]

    def stop(self) -> None:
        """Kill both nodes' process groups, worker node first."""
        for proc in reversed(self._procs):
            _kill_group(proc)
        self._procs.clear()

    def __enter__(self) -> LoopbackCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """Stop ``ray start`` and everything it started: its process group, and its descendants
    (Ray's worker processes open sessions of their own), SIGTERM first, then SIGKILL."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def serving_cluster(temp_dir: Path, resource: str = "twotower_cpu") -> LoopbackCluster:
    """The cluster the tests and the benchmark serve TwoTower on (not started yet).

    Both nodes activate the Ray CPU platform with ``resource``; gloo stays on loopback;
    each node's worker gets a core of its own (its local rank is 0 on both nodes, so vLLM's
    automatic binding would put both on the first core), or none where this process may use
    only one core.
    """
    cores = sorted(os.sched_getaffinity(0))
    binds = [str(cores[0]), str(cores[-1])] if len(cores) > 1 else ["nobind", "nobind"]
    env = {RESOURCE_ENV: resource, "GLOO_SOCKET_IFNAME": "lo"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    node_env = [{"VLLM_CPU_OMP_THREADS_BIND": bind} for bind in binds]
    return LoopbackCluster(resource, temp_dir, env=env, node_env=node_env)
