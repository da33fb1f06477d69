"""The files of a chaos run's report: report.json (the config, the summary of summary.py,
the plotted series, faults, samples, outcomes) and report.html with its plots (matplotlib,
embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import msgspec

from segue.chaos.config import ChaosConfig, FaultKind
from segue.chaos.result import RunResult
from segue.chaos.summary import Summary, ms, pct
from segue.chaos.workload import Status

# One colour per fault kind, none of them used for data lines (the browser test looks for
# the kill colour in the screenshot).
FAULT_COLORS = {
    FaultKind.KILL: "#d62728",
    FaultKind.TERM: "#ff7f0e",
    FaultKind.STOP: "#9467bd",
    FaultKind.ENGINE_KILL: "#8c564b",
    FaultKind.DISCONNECT: "#e377c2",
    FaultKind.PARTITION: "#1f77b4",
    FaultKind.SLOW: "#7f7f7f",
    FaultKind.FRONTEND_KILL: "#000080",
    FaultKind.ETCD_KILL: "#ffd92f",
    FaultKind.ETCD_STOP: "#a6761d",
}
DATA_COLORS = ["#2ca02c", "#17becf", "#bcbd22", "#006d2c", "#5e3c99", "#b35806", "#01665e"]
INK = "#222222"  # latency lines, failed requests
PLOT_SIZE = (1000, 330)  # pixels of each plot
PLOTS = ("throughput", "latency", "migrations", "workers")


def _buckets(r: RunResult) -> tuple[float, int]:
    end = max([o.end or 0.0 for o in r.outcomes] + [s.t for s in r.samples] + [1.0])
    width = max(1.0, math.ceil(end / 60))  # about 60 buckets whatever the run's length
    return width, int(end // width) + 1


def series(r: RunResult) -> dict[str, Any]:
    """What the plots show, as data (also written to the report for tools and tests)."""
    width, n = _buckets(r)
    done = [0] * n
    toks = [0] * n
    errors = [0] * n
    cancelled = [0] * n
    ttft: list[list[float]] = [[] for _ in range(n)]
    lat: list[list[float]] = [[] for _ in range(n)]
    for o in r.outcomes:
        if o.end is None:
            continue
        b = int(o.end // width)
        if o.status == Status.OK:
            done[b] += 1
            toks[b] += len(o.token_ids)
            lat[b].append(o.end - o.start)
            if o.first is not None:
                ttft[b].append(o.first - o.start)
        elif o.status == Status.CANCELLED:
            cancelled[b] += 1
        else:
            errors[b] += 1
    return {
        "bucket_s": width,
        "t": [round(i * width, 3) for i in range(n)],
        "requests_per_s": [d / width for d in done],
        "tokens_per_s": [t / width for t in toks],
        "errors": errors,
        "cancelled": cancelled,
        "ttft_p50_ms": [ms(pct(v, 0.5)) for v in ttft],
        "ttft_p99_ms": [ms(pct(v, 0.99)) for v in ttft],
        "latency_p50_ms": [ms(pct(v, 0.5)) for v in lat],
        "latency_p99_ms": [ms(pct(v, 0.99)) for v in lat],
        "faults": [
            {"t": round(e.t, 3), "kind": e.kind.value, "target": e.target, "ends": e.ends}
            for e in r.faults
            if not e.skipped
        ],
    }


def _plots(r: RunResult, data: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    size = (PLOT_SIZE[0] / dpi, PLOT_SIZE[1] / dpi)
    t = data["t"]
    out: dict[str, bytes] = {}

    def faults(ax: Any) -> None:
        seen = set()
        for e in r.faults:
            if e.skipped:
                continue
            c = FAULT_COLORS[e.kind]
            ax.axvline(e.t, color=c, lw=2, label=None if e.kind in seen else f"fault: {e.kind}")
            if e.ends is not None:
                ax.axvspan(e.t, e.ends, color=c, alpha=0.12, lw=0)
            seen.add(e.kind)

    def finish(name: str, fig: Any, ax: Any, title: str, ylabel: str) -> None:
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_xlabel("seconds since the faulted phase began")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.set_xlim(0, max(t[-1] + data["bucket_s"], 1))
        ax.legend(loc="upper left", bbox_to_anchor=(1.09, 1), fontsize=8, frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        out[name] = buf.getvalue()

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    ax.plot(t, data["requests_per_s"], color=DATA_COLORS[0], lw=1.5, label="requests/s")
    ax2 = ax.twinx()
    ax2.plot(t, data["tokens_per_s"], color=DATA_COLORS[1], lw=1.5, label="_tokens")
    ax2.set_ylabel("output tokens/s")
    faults(ax)
    ax.plot([], [], color=DATA_COLORS[1], lw=1.5, label="tokens/s (right axis)")
    finish("throughput", fig, ax, "Throughput (completed requests, exact or not)", "requests/s")

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    for key, label, color, style in (
        ("ttft_p50_ms", "TTFT p50", DATA_COLORS[0], "-"),
        ("ttft_p99_ms", "TTFT p99", DATA_COLORS[0], "--"),
        ("latency_p50_ms", "latency p50", INK, "-"),
        ("latency_p99_ms", "latency p99", INK, "--"),
    ):
        ys = [math.nan if v is None else v for v in data[key]]
        ax.plot(t, ys, color=color, ls=style, lw=1.5, label=label, marker=".", ms=3)
    ax.set_yscale("log")
    faults(ax)
    finish("latency", fig, ax, "TTFT and end-to-end latency (requests ending in each bucket)", "ms")

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    reasons = sorted({k for s in r.samples for k in s.migrations})
    st = [s.t for s in r.samples]
    for i, reason in enumerate(reasons):
        ax.step(
            st,
            [s.migrations.get(reason, 0) for s in r.samples],
            where="post",
            color=DATA_COLORS[i % len(DATA_COLORS)],
            lw=1.5,
            label=f"migrations: {reason}",
        )
    w = data["bucket_s"] * 0.8
    ax.bar(t, data["errors"], width=w, align="edge", color=INK, label="failed requests")
    ax.bar(
        t,
        data["cancelled"],
        width=w,
        align="edge",
        bottom=data["errors"],
        color="#bbbbbb",
        label="cancelled by the client",
    )
    faults(ax)
    finish("migrations", fig, ax, "Migrations (cumulative, by reason) and errors", "count")

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    names = sorted({k for s in r.samples for k in s.load})
    for i, name in enumerate(names):
        ax.plot(
            st,
            [s.load.get(name, math.nan) for s in r.samples],
            color=DATA_COLORS[i % len(DATA_COLORS)],
            lw=1.3,
            label=name,
        )
    ax.step(
        st,
        [s.routable for s in r.samples],
        where="post",
        color="#555555",
        ls=":",
        lw=1.5,
        label="routable workers",
    )
    faults(ax)
    finish("workers", fig, ax, "Per-worker load (requests running in its engine)", "requests")
    return out


_CHECK_JS = """
window.addEventListener('load', () => {
  // What the browser made of each plot (id, decoded size, place on the page), for a test
  // or a person to check that the report rendered.
  document.body.dataset.plots = JSON.stringify([...document.querySelectorAll('img.plot')].map(
    i => { const r = i.getBoundingClientRect();
           return [i.id, i.complete ? i.naturalWidth : 0, i.complete ? i.naturalHeight : 0,
                   Math.round(r.left + window.scrollX), Math.round(r.top + window.scrollY)]; }));
});
"""


def _html(
    cfg: ChaosConfig,
    summary: Summary,
    data: dict[str, Any],
    pngs: dict[str, bytes],
    r: RunResult,
) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
        for k, v in (
            (
                "verdict",
                "PASSED" if summary.passed else "FAILED: " + "; ".join(summary.problems),
            ),
            ("requests", f"{summary.requests} in {summary.duration_s} s"),
            ("exact", summary.exact),
            ("wrong", summary.wrong),
            ("failed", summary.status.get("error", 0)),
            ("hung", summary.status.get("hung", 0)),
            (
                "cancelled by the client",
                f"{summary.status.get('cancelled', 0)} "
                f"(tokens so far exact: {summary.cancelled_prefix_exact})",
            ),
            (
                "migrations",
                ", ".join(f"{k} {v}" for k, v in sorted(summary.migrations.items())) or "none",
            ),
            ("restarts", summary.restarts),
            ("TTFT p50 / p99", f"{summary.ttft_ms.p50} / {summary.ttft_ms.p99} ms"),
            (
                "latency p50 / p99",
                f"{summary.latency_ms.p50} / {summary.latency_ms.p99} ms",
            ),
            (
                "workers after the run",
                "all idle" if not summary.leaks else json.dumps(msgspec.to_builtins(summary.leaks)),
            ),
            ("frontend RSS", json.dumps(msgspec.to_builtins(summary.frontend_rss_mib))),
        )
    )
    fault_rows = "".join(
        f"<tr><td>{e.t:.2f}</td><td style='color:{FAULT_COLORS[e.kind]}'>{esc(e.kind.value)}</td>"
        f"<td>{esc(e.target)}</td><td>{esc(e.detail or e.skipped)}</td>"
        f"<td>{'' if e.recovery_s is None else f'{e.recovery_s:.2f}'}</td></tr>"
        for e in r.faults
    )
    w, h = PLOT_SIZE
    imgs = "".join(
        f"<figure><img class='plot' id='plot-{name}' width='{w}' height='{h}' alt='{name}' "
        f"src='data:image/png;base64,{base64.b64encode(pngs[name]).decode()}'></figure>"
        for name in PLOTS
    )
    verdict = "PASSED" if summary.passed else "FAILED"
    fault_head = "".join(
        f"<th>{c}</th>" for c in ("t (s)", "kind", "worker", "detail", "recovered after (s)")
    )
    payload = json.dumps({"summary": msgspec.to_builtins(summary), "series": data}).replace(
        "</", "<\\/"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>segue chaos report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
th, td {{ text-align: left; padding: 3px 10px; border-bottom: 1px solid #ddd; }}
.pass {{ color: #1a7f37; }} .fail {{ color: #cf222e; }}
figure {{ margin: 0 0 12px; }}
</style></head>
<body>
<h1>segue chaos: <span class="{verdict.lower()[:4]}">{verdict}</span></h1>
<p>{summary.requests} requests at concurrency {cfg.concurrency}, faults {esc(cfg.faults)}
every {cfg.fault_every:g} s; every answer compared with the same request's answer in a
fault-free run.</p>
<table>{rows}</table>
{imgs}
<h2>Faults</h2>
<table><tr>{fault_head}</tr>{fault_rows}</table>
<script type="application/json" id="chaos-data">{payload}</script>
<script>{_CHECK_JS}</script>
</body></html>
"""


def write(report_dir: Path, cfg: ChaosConfig, r: RunResult, summary: Summary) -> None:
    data = series(r)
    ref = {o.spec: o for o in r.reference}
    doc = {
        "config": msgspec.to_builtins(cfg),
        "summary": msgspec.to_builtins(summary),
        "series": data,
        "faults": msgspec.to_builtins(r.faults),
        "samples": msgspec.to_builtins(r.samples),
        # Tokens are kept only where they matter (wrong answers, with the reference's);
        # lengths for the rest.
        "outcomes": [
            {
                **msgspec.to_builtins(o),
                "token_ids": o.token_ids if o.verdict == "wrong" else len(o.token_ids),
                "text": o.text if o.verdict == "wrong" else "",
                **({"expected": msgspec.to_builtins(ref[o.spec])} if o.verdict == "wrong" else {}),
            }
            for o in r.outcomes
        ],
    }
    (report_dir / "report.json").write_text(json.dumps(doc, indent=1))
    pngs = _plots(r, data)
    (report_dir / "report.html").write_text(_html(cfg, summary, data, pngs, r))
