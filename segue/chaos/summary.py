"""The verdict of a chaos run, typed: what passed and every problem found, the answers'
counts, faults and recovery, migrations, latency, the resources left after; and its
terminal form. report.json holds it under "summary", with these field names."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import msgspec

from segue.chaos.config import ChaosConfig
from segue.chaos.result import EtcdAfter, RunResult, WorkerState
from segue.chaos.workload import Status


class Recovery(msgspec.Struct):
    p50_s: float | None
    max_s: float | None
    unrecovered: int  # struck, but not back within the run


class FaultCount(msgspec.Struct):
    struck: int
    skipped: int


class Percentiles(msgspec.Struct):
    p50: float | None
    p99: float | None


class ReferenceCount(msgspec.Struct):
    requests: int
    failed: int


class RssMib(msgspec.Struct):
    first: float
    last: float
    max: float
    samples: int = 0  # one per sampling interval: how long the process was seen


class FailedRequest(msgspec.Struct):
    seq: int
    spec: int
    status: str
    verdict: str | None
    error: str | None


class Summary(msgspec.Struct):
    passed: bool
    problems: list[str]
    requests: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    status: dict[str, int]  # requests by Status
    exact: int
    wrong: int
    cancelled_prefix_exact: int  # cancelled by the client, what they got exact
    lost_with_frontend: int  # not responses: in flight at a frontend that was SIGKILLed
    resumed: int  # responses whose stream broke and resumed at another frontend
    resent: int  # responses whose frontend died before it said their id: created again
    resume_gap_ms: Percentiles  # stream broken -> next event, at the other frontend
    reference: ReferenceCount
    faults: dict[str, FaultCount]
    recovery: dict[str, Recovery]
    restarts: int
    migrations: dict[str, int]  # by reason
    frontend_cancellations: int
    ttft_ms: Percentiles
    latency_ms: Percentiles
    workers_after: list[WorkerState]
    leaks: list[WorkerState]  # workers not idle after the run
    frontend_inflight_after: float
    routable_after: int
    frontend_rss_mib: dict[str, RssMib]  # each frontend process sampled twice or more
    etcd_after: EtcdAfter | None  # the etcd the run started: leases and workers left
    failures: list[FailedRequest]  # the first 50


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def summarize(cfg: ChaosConfig, r: RunResult) -> Summary:
    outs = r.outcomes
    status = Counter(o.status.value for o in outs)
    verdicts = Counter(o.verdict for o in outs)
    ok = [o for o in outs if o.status == Status.OK]
    ref_failed = [o for o in r.reference if o.status != Status.OK]
    struck = [e for e in r.faults if not e.skipped]
    recovery: dict[str, Recovery] = {}
    for kind in sorted({e.kind for e in struck if e.recoverable}):
        rec = [e.recovery_s for e in struck if e.kind == kind and e.recovery_s is not None]
        n = sum(e.kind == kind for e in struck if e.recoverable)
        recovery[kind] = Recovery(
            None if not rec else round(pct(rec, 0.5) or 0.0, 2),
            None if not rec else round(max(rec), 2),
            n - len(rec),
        )
    mig_prefix = 'segue_frontend_migrations_total{reason="'
    migrations = {
        k[len(mig_prefix) : -2]: int(v)
        for k, v in r.metrics_delta.items()
        if k.startswith(mig_prefix)
    }
    leaks = [w for w in r.workers_after if not w.idle()]
    rss: dict[str, list[float]] = {}
    for sample in r.samples:
        for proc, mib in sample.rss_mib.items():
            rss.setdefault(proc, []).append(mib)
    tokens = sum(len(o.token_ids) for o in ok)
    problems = []
    if ref_failed:
        problems.append(f"{len(ref_failed)} requests failed in the fault-free reference run")
    # chat and completions in flight at a killed frontend are lost with it (not a bug)
    killed = Counter(o.status for o in outs if o.frontend_killed)
    lost_with_frontend = killed[Status.ERROR] + killed[Status.HUNG]
    gaps = [g for o in outs for g in o.resumes]
    for what, n in (
        ("failed (lost)", status[Status.ERROR] - killed[Status.ERROR]),
        ("hung", status[Status.HUNG] - killed[Status.HUNG]),
        ("answered wrong", verdicts["wrong"]),
        ("without a reference answer", verdicts["no-reference"]),
    ):
        if n:
            problems.append(f"{n} requests {what}")
    if leaks:
        problems.append(f"{len(leaks)} workers not idle after the run")
    if len(r.workers_after) < r.routable_after:
        silent = r.routable_after - len(r.workers_after)
        problems.append(f"{silent} routable workers did not report their resources")
    if r.frontend_inflight_after:
        problems.append(f"the frontend still counts {r.frontend_inflight_after:g} in flight")
    if r.routable_after < expected_workers(r, cfg):
        problems.append(f"only {r.routable_after} workers routable after the run")
    e = r.etcd_after
    if e is not None and (e.leases != e.keys or e.keys != r.routable_after):
        problems.append(
            f"etcd holds {e.leases} leases and {e.keys} workers for {r.routable_after} routable"
        )
    failures = [
        FailedRequest(o.seq, o.spec, o.status.value, o.verdict, o.error)
        for o in outs
        if (o.status in (Status.ERROR, Status.HUNG) and not o.frontend_killed)
        or o.verdict == "wrong"
    ]
    ttfts = [o.first - o.start for o in ok if o.first is not None]
    lats = [o.end - o.start for o in ok if o.end is not None]
    return Summary(
        passed=not problems,
        problems=problems,
        requests=len(outs),
        duration_s=round(r.duration_s, 2),
        requests_per_s=round(len(outs) / r.duration_s, 2) if r.duration_s else 0.0,
        output_tokens_per_s=round(tokens / r.duration_s, 1) if r.duration_s else 0.0,
        status=dict(status),
        exact=verdicts["exact"],
        wrong=verdicts["wrong"],
        cancelled_prefix_exact=verdicts["prefix"],
        lost_with_frontend=lost_with_frontend,
        resumed=sum(bool(o.resumes) for o in outs),
        resent=sum(o.resent for o in outs),
        resume_gap_ms=Percentiles(ms(pct(gaps, 0.5)), ms(pct(gaps, 0.99))),
        reference=ReferenceCount(len(r.reference), len(ref_failed)),
        faults={
            k: FaultCount(
                sum(e.kind == k for e in struck),
                sum(e.kind == k and bool(e.skipped) for e in r.faults),
            )
            for k in sorted({e.kind for e in r.faults})
        },
        recovery=recovery,
        restarts=r.restarts,
        migrations=migrations,
        frontend_cancellations=int(r.metrics_delta.get("segue_frontend_cancellations_total", 0)),
        ttft_ms=Percentiles(ms(pct(ttfts, 0.5)), ms(pct(ttfts, 0.99))),
        latency_ms=Percentiles(ms(pct(lats, 0.5)), ms(pct(lats, 0.99))),
        workers_after=list(r.workers_after),
        leaks=leaks,
        frontend_inflight_after=r.frontend_inflight_after,
        routable_after=r.routable_after,
        frontend_rss_mib={
            proc: RssMib(round(v[0], 1), round(v[-1], 1), round(max(v), 1), len(v))
            for proc, v in rss.items()
            if len(v) >= 2
        },
        failures=failures[:50],
        etcd_after=r.etcd_after,
    )


def expected_workers(r: RunResult, cfg: ChaosConfig) -> int:
    """Workers that should be routable after the run: those the run started (restarted
    when killed); for a targeted deployment, whatever its supervisor brings back."""
    return r.expected_workers if cfg.url is None and cfg.restart else 0


def render_text(s: Summary, report_dir: Path) -> str:
    st = s.status
    lines = [
        f"segue chaos: {'PASSED' if s.passed else 'FAILED'}   report: {report_dir / 'report.html'}",
        f"requests    {s.requests} under faults in {s.duration_s} s "
        f"({s.requests_per_s}/s, {s.output_tokens_per_s} tokens/s); reference run "
        f"{s.reference.requests}, {s.reference.failed} failed",
        f"answers     exact {s.exact} · wrong {s.wrong} · failed {st.get('error', 0)} · "
        f"hung {st.get('hung', 0)} · cancelled by the client {st.get('cancelled', 0)} "
        f"(tokens so far exact: {s.cancelled_prefix_exact})",
        f"frontends   responses resumed at another frontend {s.resumed} (gap p50 "
        f"{s.resume_gap_ms.p50} ms p99 {s.resume_gap_ms.p99} ms), created again (their "
        f"frontend died before their id came) {s.resent}; requests lost with a "
        f"killed frontend {s.lost_with_frontend} (not resumable: chat and completions)",
        "faults      "
        + (
            " · ".join(
                f"{k} {v.struck}" + (f" ({v.skipped} skipped)" if v.skipped else "")
                for k, v in s.faults.items()
            )
            or "none"
        )
        + f"; {s.restarts} restarts",
        "recovery    "
        + (
            " · ".join(
                f"{k} p50 {v.p50_s} s max {v.max_s} s"
                + (f" ({v.unrecovered} not yet)" if v.unrecovered else "")
                for k, v in s.recovery.items()
            )
            or "-"
        ),
        "migrations  "
        + (" · ".join(f"{k} {v}" for k, v in sorted(s.migrations.items())) or "none")
        + f"; frontend cancellations {s.frontend_cancellations}",
        f"latency     TTFT p50 {s.ttft_ms.p50} ms p99 {s.ttft_ms.p99} ms; "
        f"end to end p50 {s.latency_ms.p50} ms p99 {s.latency_ms.p99} ms",
        "resources   "
        + (
            f"every worker idle ({len(s.workers_after)}: nothing running, waiting, "
            f"in KV blocks or held)"
            if not s.leaks
            else "NOT idle: "
            + "; ".join(
                f"{w.worker} running {w.running} waiting {w.waiting} "
                f"kv_blocks {w.kv_blocks_used} held {w.held}"
                for w in s.leaks
            )
        )
        + f"; frontend in flight {s.frontend_inflight_after:g}"
        + (
            f"; etcd leases {s.etcd_after.leases} for {s.etcd_after.keys} registered workers"
            if s.etcd_after
            else ""
        ),
    ]
    if s.frontend_rss_mib:
        rss = s.frontend_rss_mib
        oldest = max(rss, key=lambda k: rss[k].samples)
        r = rss[oldest]
        lasts = [x.last for x in rss.values()]
        lines.append(
            f"frontend    RSS of {len(rss)} processes at their last sample {min(lasts)}-"
            f"{max(lasts)} MiB; the longest seen, {oldest} ({r.samples} samples): {r.first} "
            f"MiB first, {r.last} last, max {r.max}"
        )
    for p in s.problems:
        lines.append(f"PROBLEM     {p}")
    for f in s.failures[:5]:
        lines.append(f"  request {f.seq} (spec {f.spec}): {f.status} {f.verdict} {f.error}")
    return "\n".join(lines)
