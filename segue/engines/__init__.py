"""Engines behind one interface (`segue.engines.base.Engine`)."""

from __future__ import annotations

from segue.engines.base import Engine, EngineOutput, RequestStream  # noqa: F401


def create_engine(name: str, args, tokenizer) -> Engine:
    if name == "mocker":
        from segue.engines.mocker import MockerConfig, MockerEngine

        return MockerEngine(MockerConfig.from_args(args), tokenizer)
    raise ValueError(f"unknown engine {name!r} (available: mocker)")
