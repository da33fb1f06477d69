"""`segue chaos` in pieces: its options (flags and TOML), the request mix, the oracle, the
verdict and the report's plots."""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path

import pytest

from segue.chaos import report, summary
from segue.chaos.config import ChaosConfig, FaultKind, validate
from segue.chaos.faults import FaultEvent
from segue.chaos.main import load_config
from segue.chaos.result import RunResult, Sample, WorkerState, judge_all
from segue.chaos.workload import Outcome, Status, judge, make_specs
from segue.cli import build_parser


def parse(argv: list[str]):
    ap = build_parser()
    args = ap.parse_args(["chaos", *argv])
    return load_config(args, args.chaos_parser, lambda: ap.parse_args(["chaos", *argv]))


def test_toml_options_with_flags_winning(tmp_path):
    f = tmp_path / "chaos.toml"
    f.write_text(
        'requests = 50\nfaults = "kill,stop"\nmocker-step-ms = 3.5\nstall_timeout = 1.5\n'
        "restart = false\n"
    )
    cfg, fe, wk = parse(["--config", str(f), "--requests", "7"])
    assert cfg.requests == 7  # the flag wins
    assert cfg.fault_kinds() == [FaultKind.KILL, FaultKind.STOP]
    assert cfg.restart is False
    assert wk.mocker.step_ms == 3.5  # a worker flag
    assert fe.stall_timeout == 1.5  # a frontend flag


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus = 1\n", "unknown option 'bogus'"),
        ('requests = "many"\n', "'requests'"),
        ("restart = 3\n", "'restart'"),
        ('router = "fastest"\n', "'router' must be one of"),
        ("mix = [1, 2]\n", "'mix' must be a string"),
    ],
)
def test_bad_toml_is_a_usage_error_naming_the_key(tmp_path, capsys, text, message):
    f = tmp_path / "chaos.toml"
    f.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse(["--config", str(f)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"faults": "kill,explode"}, "--faults"),
        ({"faults": "partition"}, "need --netns"),
        ({"mix": "completion,embedding"}, "unknown kind 'embedding'"),
        ({"prompt_words": "9-3"}, "--prompt-words"),
        ({"max_tokens": "x"}, "--max-tokens"),
        ({"url": "http://127.0.0.1:1", "netns": True}, "not with --url"),
        ({"sampled": 1.5}, "--sampled"),
        ({"duration": -1.0}, "--duration"),
        ({"distinct": 0}, "--distinct"),
        ({"faults": "frontend-kill"}, "--frontends 2 or more"),
        ({"url": "http://127.0.0.1:1", "frontends": 2}, "not with --url"),
        ({"frontends": 0}, "--frontends"),
    ],
)
def test_validate_names_the_bad_option(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(ChaosConfig(**changes))


def test_request_mix_is_reproducible_and_covers_every_kind():
    cfg = ChaosConfig(requests=200, prompt_words="3-9", max_tokens="2-5", sampled=0.5)
    a, b = make_specs(cfg), make_specs(cfg)
    assert a == b
    assert a != make_specs(ChaosConfig(requests=200, seed=1))
    assert {(s.kind, s.stream) for s in a} == {
        ("completion", False),
        ("completion", True),
        ("chat", False),
        ("chat", True),
    }
    assert all(3 <= len(s.prompt.split()) <= 9 and 2 <= s.max_tokens <= 5 for s in a)
    sampled = [s for s in a if s.seed is not None]
    assert 0 < len(sampled) < len(a) and all(s.temperature > 0 for s in sampled)
    assert all(s.temperature == 0 for s in a if s.seed is None)
    body = a[0].body("m")
    assert body["return_token_ids"] is True and ("messages" in body) == (a[0].kind == "chat")
    # background streamed responses: always greedy (a response's seed is its id's)
    responses = make_specs(ChaosConfig(requests=50, mix="response-stream", sampled=1.0))
    assert all(r.kind == "response" and r.stream and r.seed is None for r in responses)
    body = responses[0].body("m")
    assert body["background"] and body["stream"] and body["temperature"] == 0.0
    assert responses[0].path() == "/v1/responses"


def ok(seq: int, spec: int, tokens: list[int], **kw) -> Outcome:
    return Outcome(
        seq=seq,
        spec=spec,
        start=seq * 0.1,
        first=seq * 0.1 + 0.01,
        end=seq * 0.1 + 0.2,
        token_ids=tokens,
        text="".join(map(str, tokens)),
        finish_reason="length",
        **kw,
    )


def test_oracle():
    ref = ok(0, 0, [1, 2, 3])
    assert judge(ok(5, 0, [1, 2, 3]), ref) == "exact"
    assert judge(ok(5, 0, [1, 2, 4]), ref) == "wrong"
    same_tokens_other_text = ok(5, 0, [1, 2, 3])
    same_tokens_other_text.text = "x"
    assert judge(same_tokens_other_text, ref) == "wrong"
    assert judge(ok(5, 0, [1, 2], status=Status.CANCELLED), ref) == "prefix"
    assert judge(ok(5, 0, [2], status=Status.CANCELLED), ref) == "wrong"
    assert judge(ok(5, 0, [], status=Status.ERROR), ref) == ""
    assert judge(ok(5, 0, [1, 2, 3]), None) == "no-reference"


def run_result(**changes) -> RunResult:
    reference = [ok(i, i, [i, i + 1, 7]) for i in range(4)]
    outcomes = [ok(i, i % 4, [i % 4, i % 4 + 1, 7]) for i in range(40)]
    faults = [
        FaultEvent(t=0.5, kind=FaultKind.KILL, target="w", pid=1, slot=0, recovered=1.2),
        FaultEvent(t=1.5, kind=FaultKind.STOP, target="w", pid=2, slot=1, ends=3.5),
        FaultEvent(t=2.0, kind=FaultKind.DISCONNECT, target="clients", detail="1 streams"),
    ]
    samples = [
        Sample(
            t=i * 0.5,
            routable=3 - (i == 2),
            load={"worker0": float(i % 3), "worker1": 2.0},
            migrations={"stream_broken": float(i // 2)},
            cancellations=0.0,
            inflight=4.0,
            rss_mib={"frontend0 pid 7": 50.0 + i},
        )
        for i in range(10)
    ]
    base = dict(
        reference=reference,
        outcomes=outcomes,
        faults=faults,
        samples=samples,
        workers_after=[WorkerState("worker0", 0, 0, 0, 0), WorkerState("worker1", 0, 0, 0, 0)],
        frontend_inflight_after=0.0,
        routable_after=2,
        metrics_delta={'segue_frontend_migrations_total{reason="stream_broken"}': 4.0},
        duration_s=4.0,
        restarts=1,
        expected_workers=2,
    )
    base.update(changes)
    r = RunResult(**base)
    judge_all(r)
    return r


CFG = ChaosConfig(workers=2)


def test_verdict_passes_only_a_clean_run():
    s = summary.summarize(CFG, run_result())
    assert s.passed and s.exact == 40 and s.migrations == {"stream_broken": 4}
    assert s.recovery["kill"] == summary.Recovery(p50_s=0.7, max_s=0.7, unrecovered=0)
    assert s.recovery["stop"].unrecovered == 1
    assert "disconnect" not in s.recovery
    assert s.frontend_rss_mib == {"frontend0 pid 7": summary.RssMib(50.0, 59.0, 59.0, 10)}
    text = summary.render_text(s, Path("x"))
    assert "the longest seen, frontend0 pid 7 (10 samples): 50.0 MiB first, 59.0 last" in text

    r = run_result()
    r.outcomes[3].token_ids = [9, 9, 9]
    judge_all(r)
    assert summary.summarize(CFG, r).problems == ["1 requests answered wrong"]
    r = run_result()
    r.outcomes[4].status = Status.ERROR
    r.outcomes[5].status = Status.HUNG
    assert summary.summarize(CFG, r).problems == [
        "1 requests failed (lost)",
        "1 requests hung",
    ]
    leak = summary.summarize(
        CFG, run_result(workers_after=[WorkerState("worker1", 0, 0, 3, 0)], routable_after=1)
    )
    assert leak.problems == [
        "1 workers not idle after the run",
        "only 1 workers routable after the run",
    ]
    assert "kv_blocks 3" in summary.render_text(leak, Path("x"))
    inflight = summary.summarize(CFG, run_result(frontend_inflight_after=2.0))
    assert inflight.problems == ["the frontend still counts 2 in flight"]
    ref = run_result()
    ref.reference[0].status = Status.ERROR
    judge_all(ref)
    assert not summary.summarize(CFG, ref).passed


def test_report_has_every_plot_at_its_size_and_the_faults(tmp_path):
    r = run_result()
    s = summary.summarize(CFG, r)
    report.write(tmp_path, CFG, r, s)
    page = (tmp_path / "report.html").read_text()
    pngs = re.findall(
        r"id='plot-(\w+)' width='(\d+)' height='(\d+)' alt='\w+' "
        r"src='data:image/png;base64,([^']+)'",
        page,
    )
    assert [p[0] for p in pngs] == list(report.PLOTS)
    for _, w, h, data in pngs:
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", png[16:24]) == (int(w), int(h)) == report.PLOT_SIZE
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [f["kind"] for f in doc["series"]["faults"]] == ["kill", "stop", "disconnect"]
    assert doc["summary"]["passed"] is True
    assert sum(doc["series"]["requests_per_s"]) * doc["series"]["bucket_s"] == 40
