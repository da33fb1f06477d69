"""The Responses API through the openai client, on real frontend and mocker processes: two
frontends share discovery and the response store, so a background response created at one
is read, resumed, cancelled and taken over at the other, and a stream resumed after event N
goes on exactly where it left off, even when the frontend that generated it was SIGKILLed
or drained."""

from __future__ import annotations

import signal

import httpx
import openai
import pytest
from etcd import Etcd
from faults import metric, worker_of
from harness import Deployment, wait_until
from redis_server import Redis

MODEL = "segue-mocker"
PROMPT = "the river and the sea"
SLOW = ("--mocker-step-ms", "20", "--mocker-batch-slowdown", "0")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(params=["sqlite+file", "redis+etcd"])
def two_frontends(request, tmp_path):
    """Two frontends sharing discovery and a response store: the embedded SQLite file with
    file discovery, or Redis with etcd (as frontends on several machines would)."""
    servers: list = []
    if request.param == "redis+etcd":
        servers = [Etcd(tmp_path), Redis(tmp_path)]
        d = Deployment(tmp_path, discovery=servers[0].spec)
        extra: tuple[str, ...] = ("--store", servers[1].url)
    else:
        d, extra = Deployment(tmp_path), ()
    try:
        d.start_frontend(*extra)
        d.start_frontend(*extra)
        yield d
    finally:
        d.stop()
        for s in servers:
            s.stop()


def text_of(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_create_whole_and_streamed_equal_a_chat_completion(agg2):
    """A response is the chat completion of its conversation: same text, same usage; its
    stream is OpenAI's events, numbered from 0 without a gap."""
    c = client(agg2.url)
    chat = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0,
    )
    r = c.responses.create(
        model=MODEL, instructions="be brief", input=PROMPT, max_output_tokens=12, temperature=0
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 12
    events = list(
        c.responses.create(
            model=MODEL, instructions="be brief", input=PROMPT, max_output_tokens=12,
            temperature=0, stream=True,
        )
    )  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert text_of(events) == r.output_text == events[-1].response.output_text
    assert c.responses.retrieve(events[-1].response.id).output_text == r.output_text


def test_structured_tool_call_and_round_trip(agg2):
    """text.format constrains the output (the stream helper's completed response parses);
    a forced function call comes back as a function_call item; its output goes back as a
    function_call_output item with previous_response_id and the model answers."""
    pytest.importorskip("xgrammar")
    c = client(agg2.url)
    schema = {
        "type": "object",
        "properties": {"depth": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["depth", "ok"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "r", "schema": schema, "strict": True}}
    # greedy: the same answer every run (sampled, a long integer now and then ran past 60)
    with c.responses.stream(
        model=MODEL, input=PROMPT, max_output_tokens=60, text=fmt, temperature=0
    ) as s:
        final = s.get_final_response()
    assert final.status == "completed"
    import json

    assert set(json.loads(final.output_text)) == {"depth", "ok"}
    tool = {"type": "function", "name": "tide", "parameters": schema}
    r = c.responses.create(
        model=MODEL, input=PROMPT, tools=[tool], tool_choice="required", max_output_tokens=300,
        temperature=0,
    )  # fmt: skip
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "tide" and set(json.loads(call.arguments)) == {"depth", "ok"}
    answer = c.responses.create(
        model=MODEL,
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "4 m"}],
        max_output_tokens=8,
    )
    assert answer.status in ("completed", "incomplete") and answer.output_text
    items = list(c.responses.input_items.list(answer.id))
    assert [i.type for i in items] == ["function_call_output"]


def background_head(fe, max_tokens: int, n: int):
    """A background streamed response started at `fe`, and its first `n` events."""
    s = client(fe.url).responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=max_tokens, temperature=0,
        background=True, stream=True,
    )  # fmt: skip
    head = []
    for e in s:
        head.append(e)
        if len(head) == n:
            break
    return s, head


def test_background_stream_resumes_at_another_frontend(two_frontends):
    """A client reads part of a background stream at one frontend, leaves, and resumes at
    the other with starting_after: it gets every later event, numbered on, and the whole
    equals the uninterrupted stream (read again from the store at the end)."""
    d = two_frontends
    d.start_worker(*SLOW)
    a, b = d.frontends
    s, head = background_head(a, 60, 8)
    s.close()
    rid = head[0].response.id
    assert head[0].response.status == "queued" and head[0].response.background
    n = head[-1].sequence_number
    tail = list(client(b.url).responses.retrieve(rid, stream=True, starting_after=n))
    assert [e.sequence_number for e in head + tail] == list(range(len(head) + len(tail)))
    assert tail[-1].type == "response.incomplete"
    again = list(client(b.url).responses.retrieve(rid, stream=True, starting_after=-1))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in head + tail]
    assert metric(b, "segue_frontend_response_resumes_total") == 2


def wait_resumable(fe, rid: str, n: int) -> None:
    """Until frontend `fe`'s store has written event `n` of `rid`."""
    url = f"{fe.url}/v1/responses/{rid}?stream=true&starting_after={n - 1}"

    def written() -> bool:
        with httpx.stream("GET", url, timeout=10) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    return True
        return False

    wait_until(written, timeout=10, what=f"event {n} stored")


def test_background_response_survives_its_frontend(two_frontends):
    """The frontend generating a background response is SIGKILLed mid-stream; the client
    resumes at the other frontend, which takes the response over at once (the killed
    owner's pid is gone) and continues it from its stored tokens: the events after N go on
    exactly, and the text equals an uninterrupted response's (greedy, same input)."""
    d = two_frontends
    w = d.start_worker(*SLOW)
    a, b = d.frontends
    want = client(b.url).responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=200, temperature=0
    )
    s, head = background_head(a, 200, 6)
    rid = head[0].response.id
    wait_resumable(b, rid, 6)  # what the client has, the store has too
    w.signal(signal.SIGSTOP)  # no progress while the frontend goes: it is mid-answer
    try:
        a.signal(signal.SIGKILL)
        a.popen.wait(10)
    finally:
        w.signal(signal.SIGCONT)
    s.close()
    n = head[-1].sequence_number
    tail = list(client(b.url).responses.retrieve(rid, stream=True, starting_after=n))
    events = head + tail
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete"
    assert text_of(events) == want.output_text == events[-1].response.output_text
    items = {e.item_id for e in events if e.type == "response.output_text.delta"}
    assert len(items) == 1  # the taker's item ids are the first owner's
    assert metric(b, "segue_frontend_response_takeovers_total") == 1
    assert client(b.url).responses.retrieve(rid).status == "incomplete"


def test_cancel_at_another_frontend_stops_the_generation(two_frontends):
    d = two_frontends
    w = d.start_worker(*SLOW)
    a, b = d.frontends
    r = client(a.url).responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=2000, background=True
    )
    wait_until(
        lambda: w.metrics()["segue_engine_running_requests"] == 1, what="the response running"
    )
    assert client(b.url).responses.cancel(r.id).status == "cancelled"
    wait_until(
        lambda: (
            w.metrics()["segue_engine_running_requests"] == 0
            and w.metrics()["segue_engine_kv_blocks_used"] == 0
        ),
        what="the worker freed the response",
    )
    assert client(a.url).responses.retrieve(r.id).status == "cancelled"
    assert client(b.url).responses.cancel(r.id).status == "cancelled"  # idempotent


def test_bad_requests_name_the_problem(agg2):
    url = agg2.url + "/v1/responses"
    cases = [
        ({"model": MODEL, "input": "x", "reasoning": {}}, 400, "reasoning"),
        ({"model": MODEL, "input": "x", "background": True, "store": False}, 400, "store"),
        ({"model": MODEL, "input": "x", "previous_response_id": "resp_nope"}, 404, "resp_nope"),
        ({"model": MODEL, "input": [{"type": "image"}]}, 400, "input[0].type"),
        ({"model": MODEL, "input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format"),
    ]
    for body, status, named in cases:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert named in r.text
    assert httpx.get(url + "/resp_nope", timeout=10).status_code == 404
    assert httpx.post(url + "/resp_nope/cancel", timeout=10).status_code == 404
    assert httpx.delete(url + "/resp_nope", timeout=10).status_code == 404
    done = client(agg2.url).responses.create(
        model=MODEL, input="x", max_output_tokens=3, background=True
    )
    wait_until(
        lambda: client(agg2.url).responses.retrieve(done.id).status == "incomplete",
        what="done",
    )
    r = httpx.get(f"{url}/{done.id}", params={"stream": "true", "starting_after": 99})
    assert r.status_code == 400 and "starting_after" in r.text
    assert client(agg2.url).responses.cancel(done.id).status == "incomplete"  # unchanged


def test_with_redis_down_only_what_needs_it_fails_and_at_once(deploy, tmp_path):
    """A request that needs the store gets a 503 naming it within the store's timeout
    (never a hang); store: false, chat and completions are unaffected; when Redis is back
    the store is used again."""
    server = Redis(tmp_path)
    try:
        deploy.start_frontend("--store", server.url)
        deploy.start_worker()
        c = client(deploy.url)
        assert c.responses.create(model=MODEL, input="x", max_output_tokens=3).status
        server.stop()
        r = httpx.post(
            deploy.url + "/v1/responses",
            json={"model": MODEL, "input": "x", "max_output_tokens": 3},
            timeout=30,
        )
        assert r.status_code == 503 and "response store" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "store_unavailable"
        free = c.responses.create(model=MODEL, input="x", max_output_tokens=3, store=False)
        assert free.status == "incomplete"
        chat = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3
        )
        assert chat.choices[0].finish_reason == "length"
        assert metric(deploy, "segue_frontend_store_errors_total") >= 1
        server.start()
        back = c.responses.create(model=MODEL, input="x", max_output_tokens=3)
        assert c.responses.retrieve(back.id).status == "incomplete"
    finally:
        deploy.stop()
        server.stop()


COMPUTED = 'segue_engine_prompt_tokens_total{source="computed"}'


def under_way(deploy, *a_args: str, max_tokens: int = 200):
    """Two frontends, two slow workers, an uninterrupted response (`want`) and the same
    one in the background at frontend A (started with `a_args`), its first 6 events read."""
    deploy.start_frontend(*a_args)
    deploy.start_frontend()
    a, b = deploy.frontends
    deploy.start_worker(*SLOW)
    deploy.start_worker(*SLOW)
    want = client(b.url).responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=max_tokens, temperature=0
    )
    s, head = background_head(a, max_tokens, 6)
    return a, b, want, s, head


def resume_exactly(fe, head, want) -> None:
    """The events after `head`, read at frontend `fe`: numbered on without a gap, the
    whole text that of the uninterrupted response."""
    rid, n = head[0].response.id, head[-1].sequence_number
    tail = list(client(fe.url).responses.retrieve(rid, stream=True, starting_after=n))
    events = head + tail
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert text_of(events) == want.output_text and events[-1].type == "response.incomplete"


def test_a_taken_over_response_attaches_to_its_running_request(deploy):
    """Its frontend SIGKILLed, the worker keeps the background response running
    (--detach-grace); the frontend that takes it over attaches to it there: the client's
    events go on exactly, and no worker computed its context again."""
    a, b, want, s, head = under_way(deploy)
    rid = head[0].response.id
    holder = worker_of(deploy, rid)
    other = next(w for w in deploy.workers if w is not holder)
    wait_resumable(b, rid, 6)
    computed = {w.name: metric(w, COMPUTED) for w in deploy.workers}
    a.signal(signal.SIGKILL)
    a.popen.wait(10)
    s.close()
    holder.wait_log(f"Detached Request ID: {rid}")
    resume_exactly(b, head, want)
    assert f"Attached Request ID: {rid}" in holder.log()
    assert f"New Request ID: {rid}" not in other.log()
    assert metric(holder, "segue_worker_attached_total") == 1
    assert {w.name: metric(w, COMPUTED) for w in deploy.workers} == computed  # nothing again
    wait_until(lambda: all(idle(w) for w in deploy.workers), what="both workers idle")


def test_a_drained_frontend_lets_its_background_streams_go_at_the_deadline(deploy):
    """A frontend SIGTERMed (a rolling update) goes on streaming its background response
    until its drain deadline, then lets it go: the client's stream ends without a terminal
    event, the worker keeps the request (a DETACH record, not a cancel), and the client
    resumes at the other frontend, which attaches there: exact, nothing computed again."""
    a, b, want, s, head = under_way(deploy, "--shutdown-grace", "3", max_tokens=600)
    rid = head[0].response.id
    holder = worker_of(deploy, rid)
    computed = {w.name: metric(w, COMPUTED) for w in deploy.workers}
    a.signal(signal.SIGTERM)
    rest = list(s)  # A streams on through its drain, then ends the stream
    assert rest and not any(e.type in ("response.completed", "response.incomplete") for e in rest)
    a.popen.wait(10)
    assert f"Detached Response ID: {rid} (frontend stopping)" in a.log()
    holder.wait_log(f"Detached Request ID: {rid}")
    resume_exactly(b, head + rest, want)
    assert f"Attached Request ID: {rid}" in holder.log()
    assert {w.name: metric(w, COMPUTED) for w in deploy.workers} == computed
    wait_until(lambda: all(idle(w) for w in deploy.workers), what="both workers idle")


def test_a_detached_request_nobody_attaches_to_is_aborted_after_the_grace(deploy):
    deploy.start_frontend()
    w = deploy.start_worker(*SLOW, "--detach-grace", "0.5")
    s, head = background_head(deploy.frontend, 2000, 3)
    rid = head[0].response.id
    deploy.frontend.signal(signal.SIGKILL)
    deploy.frontend.popen.wait(10)
    s.close()
    w.wait_log(f"Detached Request ID: {rid}")
    w.wait_log(f"Aborted Request ID: {rid}")  # after 0.5 s, nobody having come for it
    assert "(detached: nobody attached)" in w.log()
    wait_until(lambda: idle(w), what="the worker freed it")


def idle(w) -> bool:
    m = w.metrics()
    return m["segue_engine_running_requests"] == 0 and m["segue_engine_kv_blocks_used"] == 0


def test_frontend_and_worker_both_killed_resumes_from_the_store(deploy):
    """The frontend and the worker holding its background response both SIGKILLed: the
    frontend that takes it over continues it on the other worker from its stored tokens
    (a migration): the client's events go on exactly."""
    a, b, want, s, head = under_way(deploy)
    rid = head[0].response.id
    holder = worker_of(deploy, rid)
    wait_resumable(b, rid, 6)
    holder.signal(signal.SIGKILL)
    a.signal(signal.SIGKILL)
    s.close()
    resume_exactly(b, head, want)
    other = next(w for w in deploy.workers if w is not holder)
    assert f"New Request ID: {rid}" in other.log()


def test_a_polled_background_response_outlives_the_frontend_that_made_it(deploy):
    """`background: true` without a stream, its frontend SIGKILLed right after answering:
    polling GET /v1/responses/{id} at another frontend sees it taken over and completed,
    with the output an uninterrupted response has."""
    deploy.start_frontend()
    deploy.start_frontend()
    a, b = deploy.frontends
    deploy.start_worker(*SLOW)
    want = client(b.url).responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=100, temperature=0
    )
    r = client(a.url).responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=100, temperature=0, background=True
    )
    assert r.status == "queued"
    a.signal(signal.SIGKILL)
    wait_until(
        lambda: client(b.url).responses.retrieve(r.id).status == "incomplete",
        timeout=30,
        what="the response finished elsewhere",
    )
    assert client(b.url).responses.retrieve(r.id).output_text == want.output_text
