"""Client helpers for fault tests: requests with known ids, token ids returned."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

MODEL = "segue-mocker"


@dataclass
class Result:
    status: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None
    done: bool = False  # saw [DONE]

    @property
    def counts(self) -> dict | None:
        """The usage's token counts: what must match an uninterrupted run (how much of the
        prompt a worker found in its prefix cache depends on what it served before)."""
        if self.usage is None:
            return None
        return {k: v for k, v in self.usage.items() if k != "prompt_tokens_details"}


def uid(prefix: str) -> str:
    """A request id unique across repeated runs against one deployment."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def body(kind: str, prompt: str, max_tokens: int, stream: bool, **extra) -> dict:
    b = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "return_token_ids": True,
        **extra,
    }
    if kind == "chat":
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


def path(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


def complete(url: str, kind: str, b: dict, rid: str | None = None, timeout: float = 120) -> Result:
    """Non-streaming request."""
    headers = {"X-Request-Id": rid} if rid else {}
    import httpx  # a test extra; the benchmarks use only RawRequest and body from here

    r = httpx.post(url + path(kind), json=b, headers=headers, timeout=timeout)
    if r.status_code != 200:
        return Result(r.status_code, error=r.json().get("error"))
    ch = r.json()["choices"][0]
    text = ch["message"]["content"] if kind == "chat" else ch["text"]
    return Result(200, ch["token_ids"], text, ch["finish_reason"], r.json()["usage"], done=True)


class StreamReader:
    """A streaming request read event by event, so a test can act between tokens."""

    def __init__(
        self, url: str, kind: str, b: dict, rid: str, timeout: float = 120, headers=None
    ) -> None:
        self.kind = kind
        import httpx

        self._client = httpx.Client(timeout=timeout)
        self._cm = self._client.stream(
            "POST", url + path(kind), json=b, headers={"X-Request-Id": rid, **(headers or {})}
        )
        self.resp = self._cm.__enter__()
        self.result = Result(self.resp.status_code)
        self._lines = self.resp.iter_lines()

    def events(self) -> Iterator[dict]:
        for line in self._lines:
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                self.result.done = True
                return
            ev = json.loads(line[6:])
            r = self.result
            if "error" in ev:
                r.error = ev["error"]
            if ev.get("usage"):
                r.usage = ev["usage"]
            for ch in ev.get("choices", []):
                r.token_ids += ch.get("token_ids", [])
                r.text += (ch["delta"].get("content") or "") if self.kind == "chat" else ch["text"]
                r.finish_reason = ch["finish_reason"] or r.finish_reason
            yield ev

    def read_tokens(self, n: int) -> None:
        """Read until at least n tokens have arrived."""
        for _ in self.events():
            if len(self.result.token_ids) >= n:
                return
        raise AssertionError(f"stream ended after {len(self.result.token_ids)} tokens")

    def finish(self) -> Result:
        for _ in self.events():
            pass
        self.close()
        return self.result

    def close(self) -> None:
        self._cm.__exit__(None, None, None)
        self._client.close()


class RawRequest:
    """An HTTP request over a plain socket, so a test controls how the client goes away:
    `close(abrupt=True)` sends a TCP RST (SO_LINGER 0), `abrupt=False` a normal FIN."""

    def __init__(self, url: str, kind: str, b: dict, rid: str) -> None:
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(url)
        payload = json.dumps(b).encode()
        self.sock = socket.create_connection((u.hostname, u.port), timeout=30)
        head = (
            f"POST {path(kind)} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"X-Request-Id: {rid}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + payload)
        self.received = b""

    def read_events(self, n: int) -> None:
        """Read until n SSE data events have arrived."""
        while self.received.count(b"data: ") < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed early: {self.received[-300:]!r}")
            self.received += chunk

    def read_all(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.received += chunk
            if self.received.endswith(b"0\r\n\r\n") or (
                b"Content-Length" in self.received and self.received.endswith(b"}")
            ):
                break
        return self.received

    def close(self, abrupt: bool = True) -> None:
        import socket
        import struct

        if abrupt:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            # FIN, then drain until the server closes too, so no RST is sent.
            self.sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while self.sock.recv(65536):
                    pass
        self.sock.close()
