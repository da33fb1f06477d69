"""The phases of a chaos run on a deployment: send every request once without faults (the
reference), send the run's requests again while faults strike, sampling the deployment,
then wait for the workers to be idle and record their resources (segue.chaos.main runs it;
summary.py judges what it recorded)."""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from segue import health
from segue.chaos.config import ChaosConfig
from segue.chaos.deployment import Deployment, DeploymentError, LocalDeployment, rss_mib
from segue.chaos.faults import Injector, WorkerView
from segue.chaos.result import EtcdAfter, RunResult, Sample, WorkerState
from segue.chaos.workload import Outcome, RequestSpec, Status, make_specs, send
from segue.engines.base import EngineStats
from segue.promtext import read_samples

SAMPLE_EVERY = 0.5
SAMPLED_PER_S = 128  # worker /health reads per second at most, for a large fleet


class Probe:
    """The frontend's and workers' /health and /metrics, read over HTTP."""

    def __init__(self, session: aiohttp.ClientSession, dep: Deployment) -> None:
        self.s = session
        self.dep = dep
        self.timeout = aiohttp.ClientTimeout(total=1)

    async def _get(
        self, url: str, timeout: aiohttp.ClientTimeout | None = None
    ) -> tuple[int, bytes] | None:
        try:
            async with self.s.get(url, timeout=timeout or self.timeout) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def workers(self) -> list[WorkerView] | None:
        got = await self._get(self.dep.url + "/health")
        body = None if got is None else health.decode_frontend(got[1])
        if body is None:
            return None
        return [WorkerView(w.id, w.pid, w.url, w.routable, w.role.value) for w in body.workers]

    async def metrics(self, url: str) -> dict[str, float]:
        got = await self._get(url + "/metrics")
        return read_samples(got[1].decode()) if got and got[0] == 200 else {}

    async def engine(self, url: str, timeout: float = 0.5) -> EngineStats | None:
        got = await self._get(url + "/health", aiohttp.ClientTimeout(total=timeout))
        body = None if got is None else health.decode_worker(got[1])
        return None if body is None else body.engine

    def name(self, w: WorkerView) -> str:
        """The worker's place (`worker3`), and which replica of it in a fleet process."""
        slot = self.slot_name(w)
        return slot if self.dep.replicas == 1 else f"{slot}/{w.id}"

    def slot_name(self, w: WorkerView) -> str:
        slot = self.dep.slot_of(w.pid)
        return f"worker{slot}" if slot is not None else f"worker {w.id[:8]}"


class Load:
    """Closed-loop clients sending requests in a given order; what each got is recorded
    as it arrives, so a client walking away (a disconnect fault) keeps its tokens so far."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        bases: Callable[[], list[str]],
        model: str,
        specs: list[RequestSpec],
        deadline: float,
        tag: str,
    ) -> None:
        self.s, self.bases, self.model, self.specs, self.deadline = (
            session,
            bases,
            model,
            specs,
            deadline,
        )
        self.tag = tag  # request ids are chaos-{tag}-{seq}
        self.inflight: dict[int, tuple[Outcome, asyncio.Task[None]]] = {}
        self.killed: set[str] = set()  # frontends SIGKILLed during the run
        self.done: list[Outcome] = []
        self.failed = 0  # lost or hung so far, for the progress bar
        self.t0 = time.monotonic()

    async def run(
        self, order: Iterable[int], concurrency: int, t0: float, until: float | None = None
    ) -> list[Outcome]:
        """Sends the specs `order` names until it ends or, with `until`, until then
        (monotonic time)."""
        self.t0 = t0
        it = iter(enumerate(order))

        async def client() -> None:
            for seq, spec_i in it:
                if until is not None and time.monotonic() >= until:
                    break
                out = Outcome(
                    seq=seq,
                    spec=spec_i,
                    start=time.monotonic() - t0,
                    request_id=f"chaos-{self.tag}-{seq}",
                )
                spec = self.specs[spec_i]
                task = asyncio.create_task(
                    send(self.s, self.bases, self.model, spec, out, t0, self.deadline)
                )
                self.inflight[seq] = (out, task)
                await asyncio.wait([task])
                del self.inflight[seq]
                if out.frontend in self.killed and spec.kind != "response":
                    out.frontend_killed = True  # sent as (or just before) it was killed
                if task.cancelled():
                    out.end = time.monotonic() - t0
                self.failed += out.status in (Status.ERROR, Status.HUNG)
                self.done.append(out)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return sorted(self.done, key=lambda o: o.seq)

    def frontend_killed(self, url: str) -> None:
        """A frontend was just SIGKILLed: a response in flight there resumes elsewhere;
        anything else sent to it is lost with it (counted apart)."""
        self.killed.add(url)

    def disconnect(self, rng: random.Random) -> int:
        """Walks away from a quarter (at least one) of the streams that have started."""
        streams = [
            (out, task)
            for out, task in self.inflight.values()
            if self.specs[out.spec].stream and out.first is not None and not task.done()
        ]
        if not streams:
            return 0
        chosen = rng.sample(streams, max(1, len(streams) // 4))
        for out, task in chosen:
            out.status = Status.CANCELLED
            task.cancel()
        return len(chosen)


def _progress(cfg: ChaosConfig, total: int, desc: str, unit: str = "req") -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


async def _reference(
    cfg: ChaosConfig,
    session: aiohttp.ClientSession,
    dep: Deployment,
    model: str,
    specs: list,
    run_id: str,
) -> list[Outcome]:
    load = Load(session, _bases(dep), model, specs, cfg.request_deadline, f"{run_id}-ref")
    bar = _progress(cfg, len(specs), "reference run")
    task = asyncio.create_task(load.run(list(range(len(specs))), cfg.concurrency, time.monotonic()))
    while not task.done():
        await asyncio.wait([task], timeout=0.25)
        if bar is not None:
            bar.n = len(load.done)
            bar.refresh()
    if bar is not None:
        bar.close()
    return task.result()


async def _wait_ready(probe: Probe, dep: Deployment, timeout: float) -> list[WorkerView]:
    deadline = time.monotonic() + timeout
    while True:
        dep.supervise()
        ws = await probe.workers()
        routable = 0 if ws is None else sum(w.routable for w in ws)
        if ws is not None and routable >= max(1, dep.expected_workers):
            if not dep.expected_workers:  # a deployment we target: as many as it has now
                dep.expected_workers = routable
            return ws
        if time.monotonic() > deadline:
            have = 0 if ws is None else sum(w.routable for w in ws)
            raise DeploymentError(
                f"{have} of {dep.expected_workers} workers routable after {timeout:g} s"
            )
        await asyncio.sleep(0.1)


def _bases(dep: Deployment) -> Callable[[], list[str]]:
    return lambda: dep.urls() or [dep.url]


def _migrations(m: dict[str, float]) -> dict[str, float]:
    pre = 'segue_frontend_migrations_total{reason="'
    return {k[len(pre) : -2]: v for k, v in m.items() if k.startswith(pre)}


async def chaos(cfg: ChaosConfig, dep: Deployment, api_key: str | None = None) -> RunResult:
    conn = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(), headers=headers
    ) as session:
        probe = Probe(session, dep)
        await _wait_ready(probe, dep, 180.0)
        async with session.get(dep.url + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        specs = make_specs(cfg)
        run_id = secrets.token_hex(3)  # request ids chaos-RUN-SEQ, unique across runs
        reference = await _reference(cfg, session, dep, model, specs, run_id)

        m0 = await probe.metrics(dep.url)
        mig0 = _migrations(m0)
        t0 = time.monotonic()
        load = Load(session, _bases(dep), model, specs, cfg.request_deadline, run_id)
        injector = Injector(
            dep, cfg.hang_s, cfg.min_routable, cfg.seed, load.disconnect, load.frontend_killed
        )
        if cfg.duration > 0:
            order: Iterable[int] = itertools.cycle(range(len(specs)))
            until: float | None = t0 + cfg.duration
        else:
            order, until = [i % len(specs) for i in range(cfg.requests)], None
        task = asyncio.create_task(load.run(order, cfg.concurrency, t0, until))
        kinds = cfg.fault_kinds()
        rng = random.Random(cfg.seed + 2)
        next_fault = cfg.first_fault_after if kinds and cfg.fault_every > 0 else float("inf")
        samples: list[Sample] = []
        workers: list[WorkerView] = []

        async def sampler() -> None:
            # Its own task: a stopped or cut-off worker's /health takes its timeout to fail,
            # which must not hold up the faults and restarts.
            while True:
                now = time.monotonic() - t0
                samples.append(await _sample(probe, dep, workers, now, mig0))
                every = max(SAMPLE_EVERY, len(workers) / SAMPLED_PER_S)  # a fleet: less often
                await asyncio.sleep(max(0.0, every - (time.monotonic() - t0 - now)))

        sampling = asyncio.create_task(sampler())
        bar = _progress(
            cfg, round(cfg.duration) or cfg.requests, "under faults", "s" if cfg.duration else "req"
        )
        restarts = 0
        try:
            while not task.done():
                await asyncio.wait([task], timeout=0.1)
                now = time.monotonic() - t0
                restarts += len(dep.supervise())
                ws = await probe.workers()
                workers = ws if ws is not None else workers
                injector.note_health(now, workers)
                if now >= next_fault and not task.done():
                    kind = kinds[len(injector.events) % len(kinds)]
                    injector.strike(kind, now, workers)
                    spread = 1 + cfg.fault_jitter * rng.uniform(-1, 1)
                    next_fault = now + cfg.fault_every * spread
                if bar is not None:
                    bar.n = min(round(now), bar.total) if cfg.duration else len(load.done)
                    struck = sum(not e.skipped for e in injector.events)
                    bar.set_postfix(
                        faults=struck,
                        failed=load.failed,
                        routable=sum(w.routable for w in workers),
                        refresh=False,
                    )
                    bar.refresh()
        finally:
            sampling.cancel()
            injector.end_all(time.monotonic() - t0)
            if bar is not None:
                bar.close()
            if not task.done():
                task.cancel()
        outcomes = task.result()
        duration = time.monotonic() - t0
        # Settle: every fault undone; wait for replacements to be routable and every worker
        # to have nothing running, waiting or held.
        deadline = time.monotonic() + cfg.settle_timeout
        while True:
            now = time.monotonic() - t0
            restarts += len(dep.supervise())
            workers = await probe.workers() or []
            injector.note_health(now, workers)
            states = await _worker_states(probe, [w for w in workers if w.routable])
            fe = await probe.metrics(dep.url)
            inflight = fe.get("segue_frontend_inflight_requests", 0.0)
            routable = sum(w.routable for w in workers)
            samples.append(await _sample(probe, dep, workers, now, mig0))
            whole = dep.whole() and (
                routable >= dep.expected_workers or not isinstance(dep, LocalDeployment)
            )
            answered = len(states) == routable  # a worker too slow to answer is not idle yet
            etcd_after = None
            if dep.etcd is not None:  # the leases of killed workers expire
                etcd_after = EtcdAfter(*await asyncio.to_thread(_etcd_counts, dep))
            clean = etcd_after is None or etcd_after.leases == etcd_after.keys == routable
            idle = all(s.idle() for s in states) and not inflight
            if (whole and answered and clean and idle) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        injector.note_health(time.monotonic() - t0, workers)  # what came back last
        m1 = fe
        delta = {k: v - m0.get(k, 0.0) for k, v in m1.items() if v != m0.get(k, 0.0)}
        return RunResult(
            reference=reference,
            outcomes=outcomes,
            faults=injector.events,
            samples=samples,
            workers_after=states,
            frontend_inflight_after=inflight,
            routable_after=routable,
            metrics_delta=delta,
            duration_s=duration,
            restarts=restarts,
            expected_workers=dep.expected_workers,
            etcd_after=etcd_after,
        )


def _etcd_counts(dep: Deployment) -> tuple[int, int]:
    """Leases and registered workers in the run's etcd."""
    assert dep.etcd is not None
    return dep.etcd.count_leases(), dep.etcd.count_keys("segue/")


async def _worker_states(probe: Probe, workers: list[WorkerView]) -> list[WorkerState]:
    out = []
    for w in workers:
        e = await probe.engine(w.url, timeout=3.0)
        if e is None:
            continue
        out.append(WorkerState(probe.name(w), e.running, e.waiting, e.kv_blocks_used, e.held))
    return out


async def _sample(
    probe: Probe, dep: Deployment, workers: list[WorkerView], now: float, mig0: dict[str, float]
) -> Sample:
    fe = await probe.metrics(dep.url)
    engines = await asyncio.gather(*(probe.engine(w.url) for w in workers))
    load: dict[str, float] = {}  # by place: a fleet process's replicas summed
    for w, e in zip(workers, engines, strict=True):
        if e is not None:
            name = probe.slot_name(w)
            load[name] = load.get(name, 0.0) + e.running
    mig = {k: v - mig0.get(k, 0.0) for k, v in _migrations(fe).items()}
    return Sample(
        t=round(now, 3),
        routable=sum(w.routable for w in workers),
        load=load,
        migrations={k: v for k, v in mig.items() if v},
        cancellations=fe.get("segue_frontend_cancellations_total", 0.0),
        inflight=fe.get("segue_frontend_inflight_requests", 0.0),
        rss_mib=_frontend_rss(dep),
    )


def _frontend_rss(dep: Deployment) -> dict[str, float]:
    """The RSS of each frontend process alive now (one the run started, by place and pid;
    else the one a targeted deployment serves from)."""
    procs = [(f"frontend{f.index} pid {f.pid}", f.pid) for f in dep.frontends if f.pid]
    if not procs and dep.frontend_pid:
        procs = [(f"frontend pid {dep.frontend_pid}", dep.frontend_pid)]
    out = {}
    for name, pid in procs:
        rss = rss_mib(pid)
        if rss is not None:
            out[name] = rss
    return out
