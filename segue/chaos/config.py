"""What a chaos run does: the load, the faults, the report. One frozen dataclass whose fields
are the `segue chaos` flags (segue/options.py) and the keys of its TOML file."""

from __future__ import annotations

import argparse
import enum
import tomllib
from dataclasses import dataclass
from typing import Any

from segue.frontend.config import FrontendConfig
from segue.options import add_flags, flags, option
from segue.worker.config import WorkerConfig


class FaultKind(enum.StrEnum):
    KILL = "kill"  # SIGKILL the worker: a crash
    TERM = "term"  # SIGTERM: a graceful drain (a rolling restart, a rescheduled pod)
    STOP = "stop"  # SIGSTOP, SIGCONT after --hang-s: a hung process
    ENGINE_KILL = "engine-kill"  # SIGKILL the worker's engine processes (vLLM's engine core)
    DISCONNECT = "disconnect"  # clients walk away from a quarter of the streams in flight
    PARTITION = "partition"  # the worker's host cut off for --hang-s (needs --netns)
    SLOW = "slow"  # 200 ms delay and 5 % loss on the worker's link for --hang-s (--netns)
    FRONTEND_KILL = "frontend-kill"  # SIGKILL a frontend (--frontends 2 or more)
    # SIGKILL an etcd member, by turns the leader and a follower; started again (same
    # data) after --hang-s, as its supervisor would
    ETCD_KILL = "etcd-kill"
    ETCD_STOP = "etcd-stop"  # SIGSTOP every etcd member for --hang-s: etcd gone a while


# Faults that take a worker away until a supervisor restarts it.
RESTARTING = frozenset({FaultKind.KILL, FaultKind.TERM, FaultKind.ENGINE_KILL})
NEEDS_NETNS = frozenset({FaultKind.PARTITION, FaultKind.SLOW})
ETCD_FAULTS = frozenset({FaultKind.ETCD_KILL, FaultKind.ETCD_STOP})


@dataclass(frozen=True)
class ChaosConfig:
    config: str | None = option(
        None, help="TOML file of these options (keys as the flags, without --); flags win"
    )
    url: str | None = option(
        None,
        help="target a running deployment's frontend instead of starting one; its workers "
        "listed by the frontend's /health whose processes run on this machine get the faults",
    )
    workers: int = option(3, help="workers to start (not with --url)")
    frontends: int = option(
        1,
        help="frontends to start, sharing discovery and the response store; clients spread "
        "over them (not with --url)",
    )
    etcd: int = option(
        0,
        help="discovery through an etcd cluster of this many members that the run starts "
        "(0: a shared directory; etcd faults start 3 without it; not with --url)",
    )
    requests: int = option(200, help="requests to send under faults")
    duration: float = option(
        0.0, help="seconds to keep sending under faults instead of --requests (a soak)"
    )
    concurrency: int = option(16, help="clients, each sending its next request when one ends")
    reference_concurrency: int | None = option(
        None,
        help="clients of the fault-free reference run (default: --concurrency); 1 also "
        "proves the engine's answers do not depend on what else is in its batch",
    )
    distinct: int | None = option(
        None,
        help="distinct requests the run cycles through (default: --requests, or 200 with "
        "--duration)",
    )
    mix: str = option(
        "completion,chat,completion-stream,chat-stream",
        help="request kinds drawn with equal weight (repeat one to weigh it more): "
        "completion, chat, completion-stream, chat-stream, response-stream (a background "
        "streamed Responses API request, greedy, resumed at another frontend when its "
        "stream breaks)",
    )
    prompt_words: str = option("8-200", help="prompt length range, in words")
    max_tokens: str = option("8-64", help="max_tokens range")
    sampled: float = option(
        0.25, help="share of requests sampled with a seed (the rest greedy); both reproducible"
    )
    faults: str = option(
        "kill,term,stop,disconnect",
        help="fault kinds, taken in turn: kill, term, stop, engine-kill, disconnect, "
        "partition, slow, frontend-kill, etcd-kill, etcd-stop",
    )
    fault_every: float = option(2.0, help="seconds between faults (0: none)")
    fault_jitter: float = option(
        0.0, help="spread each interval uniformly by this share (0.5: 1-3 s for every 2 s)"
    )
    first_fault_after: float = option(1.0, help="seconds of load before the first fault")
    hang_s: float = option(3.0, help="how long stop, partition and slow last")
    min_routable: int = option(
        1, help="workers that must stay routable: a fault that would leave fewer waits"
    )
    restart: bool = option(True, help="restart workers that exit (not with --url)")
    netns: bool = option(
        False, help="each started worker on a host of its own (network namespaces; root)"
    )
    request_deadline: float = option(
        120.0, help="seconds a request may take before it counts as hung"
    )
    settle_timeout: float = option(
        60.0, help="seconds after the load for every worker to be back to idle"
    )
    seed: int = option(0, help="seed of the request mix and the fault schedule")
    report_dir: str = option("chaos-report", help="where report.json and report.html go")
    progress: bool = option(True, help="a progress bar on stderr")

    def n_distinct(self) -> int:
        return self.distinct or (200 if self.duration > 0 else self.requests)

    def fault_kinds(self) -> list[FaultKind]:
        return [FaultKind(k.strip()) for k in self.faults.split(",") if k.strip()]

    def etcd_members(self) -> int:
        """Members of the etcd cluster the run starts (0: directory discovery)."""
        return self.etcd or (3 if ETCD_FAULTS & set(self.fault_kinds()) else 0)

    def mix_kinds(self) -> list[str]:
        return [k.strip() for k in self.mix.split(",") if k.strip()]


KINDS = ("completion", "chat", "completion-stream", "chat-stream", "response-stream")


def parse_range(text: str, name: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{name}: expected N or N-M, not {text!r}") from None
    if not 1 <= a <= b:
        raise ValueError(f"{name}: expected 1 <= N <= M, not {text!r}")
    return a, b


def validate(cfg: ChaosConfig) -> None:
    """Raises ValueError naming the first bad option."""
    try:
        kinds = cfg.fault_kinds()
    except ValueError as e:
        raise ValueError(f"--faults: {e}") from None
    for k in cfg.mix_kinds():
        if k not in KINDS:
            raise ValueError(f"--mix: unknown kind {k!r} (one of {', '.join(KINDS)})")
    if not cfg.mix_kinds():
        raise ValueError("--mix: no request kinds")
    parse_range(cfg.prompt_words, "--prompt-words")
    parse_range(cfg.max_tokens, "--max-tokens")
    optional = [n for n in (cfg.distinct, cfg.reference_concurrency) if n is not None]
    if min(cfg.requests, cfg.concurrency, *optional) < 1:
        raise ValueError(
            "--requests, --distinct, --concurrency and --reference-concurrency must be at least 1"
        )
    if cfg.duration < 0:
        raise ValueError("--duration must not be negative")
    if cfg.url is not None and cfg.netns:
        raise ValueError("--netns places workers this run starts: not with --url")
    if not cfg.netns and NEEDS_NETNS & set(kinds):
        raise ValueError("partition and slow faults need --netns (workers on hosts of their own)")
    if cfg.frontends < 1:
        raise ValueError("--frontends must be at least 1")
    if cfg.url is not None and cfg.frontends != 1:
        raise ValueError("--frontends starts frontends: not with --url")
    if FaultKind.FRONTEND_KILL in kinds and cfg.frontends < 2:
        raise ValueError("frontend-kill faults need --frontends 2 or more (one must serve)")
    if cfg.etcd < 0:
        raise ValueError("--etcd must not be negative")
    if cfg.url is not None and (cfg.etcd or ETCD_FAULTS & set(kinds)):
        raise ValueError("--etcd and etcd faults strike the etcd the run starts: not with --url")
    if FaultKind.ETCD_KILL in kinds and cfg.etcd_members() < 3:
        raise ValueError("etcd-kill faults need --etcd 3 or more (a quorum must survive)")
    if not 0.0 <= cfg.sampled <= 1.0:
        raise ValueError("--sampled is a share between 0 and 1")


def toml_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The TOML file's keys as argparse defaults (so flags given on the command line win).
    Keys are flag names without the dashes (`fault-every` or `fault_every`); an unknown key
    or a value of the wrong type is an error naming it."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    actions = {a.dest: a for a in parser._actions}
    # a flag's aliases name it too (`kv-blocks` for `--hf-kv-blocks`)
    for a in parser._actions:
        for opt in a.option_strings:
            actions.setdefault(opt.lstrip("-").replace("-", "_"), a)
    out: dict[str, Any] = {}
    for key, value in data.items():
        action = actions.get(key.replace("-", "_"))
        if action is None or action.dest in ("config", "help"):
            raise ValueError(f"{path}: unknown option {key!r}")
        dest = action.dest
        if isinstance(value, (dict, list)):
            raise ValueError(f"{path}: {key!r} must be a string, number or boolean")
        # Through the flag's own parser, so a TOML value is checked as a flag's would be.
        text = str(value).lower() if isinstance(value, bool) else str(value)
        conv: Any = action.type or str
        try:
            converted = conv(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{path}: {key!r}: {e}") from None
        if action.choices is not None and converted not in action.choices:
            raise ValueError(f"{path}: {key!r} must be one of {', '.join(action.choices)}")
        out[dest] = converted
    return out


CHAOS_DESTS = frozenset(f.dest for f in flags(ChaosConfig))

# `segue chaos` sets these itself (the deployment's wiring), as `segue serve` does.
CHAOS_SKIP_FRONTEND = frozenset({"discovery", "namespace", "host", "port", "listen_fd"})
CHAOS_SKIP_WORKER = frozenset({"discovery", "namespace", "host", "port", "role"})


def add_chaos_args(p: argparse.ArgumentParser) -> None:
    """The chaos flags, then every frontend and worker flag chaos does not set itself
    (here, not in run.py, so building the CLI's parser imports no HTTP client)."""
    add_flags(p, ChaosConfig)
    add_flags(p, FrontendConfig, skip=CHAOS_SKIP_FRONTEND | CHAOS_DESTS)
    add_flags(p, WorkerConfig, skip=CHAOS_SKIP_WORKER | CHAOS_DESTS)
