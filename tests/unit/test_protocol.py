from __future__ import annotations

from segue.protocol import (
    EngineRequest,
    Final,
    FrameParser,
    KeepAlive,
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
