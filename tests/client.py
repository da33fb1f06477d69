"""Client helpers for fault tests: requests with known ids, token ids returned."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

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


def body(kind: str, prompt: str, max_tokens: int, stream: bool, **extra) -> dict:
    b = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
         "return_token_ids": True, **extra}
    if kind == "chat":
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


def path(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


def complete(url: str, kind: str, b: dict, rid: str | None = None,
             timeout: float = 120) -> Result:
    """Non-streaming request."""
    headers = {"X-Request-Id": rid} if rid else {}
    r = httpx.post(url + path(kind), json=b, headers=headers, timeout=timeout)
    if r.status_code != 200:
        return Result(r.status_code, error=r.json().get("error"))
    ch = r.json()["choices"][0]
    text = ch["message"]["content"] if kind == "chat" else ch["text"]
    return Result(200, ch["token_ids"], text, ch["finish_reason"], r.json()["usage"], done=True)


class StreamReader:
    """A streaming request read event by event, so a test can act between tokens."""

    def __init__(self, url: str, kind: str, b: dict, rid: str, timeout: float = 120) -> None:
        self.kind = kind
        self._client = httpx.Client(timeout=timeout)
        self._cm = self._client.stream("POST", url + path(kind), json=b,
                                       headers={"X-Request-Id": rid})
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
                r.text += (ch["delta"].get("content") or "") if self.kind == "chat" \
                    else ch["text"]
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
