"""One config source per component: every frontend and worker flag that `segue serve`
takes reaches the process that uses it, with its value."""

from __future__ import annotations

import dataclasses
import enum

from segue.cli import build_parser
from segue.frontend.config import FrontendConfig
from segue.options import Flag, flags, from_args, to_argv
from segue.serve import SERVE_SKIP_FRONTEND, SERVE_SKIP_WORKER, ServeConfig, child_argvs
from segue.worker.config import WorkerConfig


def other_value(fl: Flag) -> str:
    """A value for the flag that is not its default."""
    if fl.choices:
        return next(c for c in fl.choices if c != getattr(fl.default, "value", fl.default))
    if fl.type is bool:
        return str(not fl.default)
    if fl.type is int:
        return str((fl.default or 0) + 7)
    if fl.type is float:
        return str((fl.default or 0.0) + 1.5)
    return f"/x/{fl.dest}"


def test_every_flag_given_to_serve_reaches_its_process():
    given: dict[str, tuple[str, str]] = {}
    for cls, skip in ((FrontendConfig, SERVE_SKIP_FRONTEND), (WorkerConfig, SERVE_SKIP_WORKER)):
        for fl in flags(cls):
            if fl.dest not in skip:
                given.setdefault(fl.dest, (fl.flag, other_value(fl)))
    argv = ["serve", "--workers", "3"] + [x for pair in given.values() for x in pair]
    args = build_parser().parse_args(argv)
    want_fe = from_args(FrontendConfig, args, SERVE_SKIP_FRONTEND, discovery="file:/d")
    want_wk = from_args(WorkerConfig, args, SERVE_SKIP_WORKER, discovery="file:/d")
    assert from_args(ServeConfig, args).workers == 3

    fe_argv, wk_argv = child_argvs(want_fe, want_wk, "file:/d")
    got_fe = from_args(FrontendConfig, build_parser().parse_args(fe_argv))
    got_wk = from_args(WorkerConfig, build_parser().parse_args(wk_argv))
    assert got_fe == want_fe and got_wk == want_wk
    # and every value given is in force there (none fell back to its default)
    for cfg, skip in ((got_fe, SERVE_SKIP_FRONTEND), (got_wk, SERVE_SKIP_WORKER)):
        for fl in flags(type(cfg)):
            if fl.dest in skip:
                continue
            value = cfg
            for name in fl.path:
                value = getattr(value, name)
            shown = value.value if isinstance(value, enum.Enum) else str(value)
            assert shown == given[fl.dest][1], fl.dest


def test_defaults_render_to_no_flags():
    assert to_argv(FrontendConfig(discovery="file:/d")) == ["--discovery", "file:/d"]
    assert to_argv(WorkerConfig(discovery="file:/d")) == ["--discovery", "file:/d"]


def test_configs_are_frozen():
    cfg = WorkerConfig(discovery="file:/d")
    assert dataclasses.is_dataclass(cfg)
    try:
        cfg.port = 1  # type: ignore[misc]
    except dataclasses.FrozenInstanceError:
        return
    raise AssertionError("WorkerConfig is mutable")
