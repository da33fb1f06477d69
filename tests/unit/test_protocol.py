from __future__ import annotations

from segue.protocol import (
    EngineRequest,
    Final,
    FrameParser,
    KeepAlive,
    Role,
    Tokens,
    decode_request,
    encode_frame,
    encode_request,
)


def test_frames_survive_any_chunking():
    frames = [Tokens(0, [1, 2, 3]), KeepAlive(), Tokens(3, [4]), Final("length", 4)]
    data = b"".join(encode_frame(f) for f in frames)
    for size in (1, 2, 3, 7, len(data)):
        p = FrameParser()
        got = []
        for i in range(0, len(data), size):
            got += p.feed(data[i : i + size])
        assert got == frames
        assert p.pending == 0


def test_request_roundtrip():
    r = EngineRequest(request_id="r", token_ids=[5, 6], max_tokens=3, start_offset=2)
    assert decode_request(encode_request(r)) == r


def test_health_bodies_round_trip_and_reject_other_bodies():
    from segue import health
    from segue.engines.base import EngineStats

    w = health.WorkerHealth(
        health.WorkerStatus.DRAINING, "w1", Role.DECODE, 7, "http://h:1", EngineStats(1, 2, 3, 4)
    )
    back = health.decode_worker(health.encode(w))
    assert back == w and back is not None and back.engine.block_size == 0
    fe = health.FrontendHealth(
        health.FrontendStatus.OK,
        [health.WorkerEntry("w1", Role.DECODE, 7, "http://h:1", "m", True, None)],
    )
    assert health.decode_frontend(health.encode(fe)) == fe
    assert health.decode_worker(b'{"status": "ok"}') is None  # fields missing
    assert health.decode_frontend(b"not json") is None
