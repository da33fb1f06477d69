"""The OpenAI API beyond one plain choice, through the openai client: several choices (`n`;
each a request of its own to the workers, reproducible with a seed, migrating on its own),
batched prompts, `echo`, `stop_token_ids`, tools, continuous usage, and vLLM's /tokenize and
/detokenize."""

from __future__ import annotations

import signal
from collections import defaultdict

import httpx
import openai
import pytest
from faults import metric, total_migrations, worker_of
from harness import wait_until

MODEL = "segue-mocker"
TOKEN_IDS = {"return_token_ids": True}


def client(d) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)


def ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_n_choices_are_seeded_independent_requests(agg2):
    c = client(agg2)
    kw = dict(
        model=MODEL, prompt="the old mill", max_tokens=12, temperature=0.8, extra_body=TOKEN_IDS
    )
    r = c.completions.create(n=3, seed=41, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({tuple(ids(ch)) for ch in r.choices}) == 3  # sampled with seeds 41, 42, 43
    for k, ch in enumerate(r.choices):  # choice k is the request with seed + k
        alone = c.completions.create(n=1, seed=41 + k, **kw).choices[0]
        assert ids(ch) == ids(alone) and ch.text == alone.text
    assert ids(c.completions.create(n=3, seed=41, **kw).choices[2]) == ids(r.choices[2])
    assert r.id.startswith("cmpl-") and not r.id.endswith("-0")  # the request's id
    assert r.usage.prompt_tokens == c.completions.create(n=1, seed=1, **kw).usage.prompt_tokens
    assert r.usage.completion_tokens == 36  # every choice's tokens
    # greedy: n copies of the same answer
    g = c.completions.create(model=MODEL, prompt="a road", max_tokens=5, temperature=0, n=2)
    assert g.choices[0].text == g.choices[1].text


def test_streaming_chat_n_matches_whole_answer(agg2):
    c = client(agg2)
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "tell me about the sea"}],
        max_tokens=15,
        temperature=0.7,
        seed=5,
        n=3,
        extra_body=TOKEN_IDS,
    )
    whole = c.chat.completions.create(**kw)
    text: dict[int, str] = defaultdict(str)
    got: dict[int, list[int]] = defaultdict(list)
    finish, roles = {}, set()
    usage = None
    for chunk in c.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw
    ):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.add(ch.index)
            text[ch.index] += ch.delta.content or ""
            got[ch.index] += ch.model_extra.get("token_ids") or []
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert roles == {0, 1, 2} and finish == {0: "length", 1: "length", 2: "length"}
    for ch in whole.choices:
        assert text[ch.index] == ch.message.content and got[ch.index] == ids(ch)
    assert usage is not None and usage.completion_tokens == 45
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_batched_prompts_strings_and_token_ids(agg2):
    c = client(agg2)
    prompts = ["the river", "a long road home"]
    r = c.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]  # prompt index x n + choice
    for i, p in enumerate(prompts):
        alone = c.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == alone.choices[0].text
    lens = [
        c.completions.create(model=MODEL, prompt=p, max_tokens=1).usage.prompt_tokens
        for p in prompts
    ]
    assert r.usage.prompt_tokens == sum(lens)  # each prompt once
    tok = c.completions.create(
        model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0, extra_body=TOKEN_IDS
    )
    assert len(tok.choices) == 2 and r.usage.completion_tokens == 24
    one = c.completions.create(
        model=MODEL, prompt=[8, 9], max_tokens=4, temperature=0, extra_body=TOKEN_IDS
    )
    assert ids(tok.choices[1]) == ids(one.choices[0])


def test_echo_puts_the_prompt_before_the_output(agg2):
    c = client(agg2)
    plain = c.completions.create(model=MODEL, prompt="the old mill", max_tokens=5, temperature=0)
    r = c.completions.create(
        model=MODEL, prompt="the old mill", max_tokens=5, temperature=0, echo=True
    )
    assert r.choices[0].text == "the old mill" + plain.choices[0].text
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL, prompt="the old mill", max_tokens=5, temperature=0, echo=True, stream=True
        )
    )
    assert streamed == r.choices[0].text


def test_n3_streaming_chat_is_exact_across_a_sigkill(deploy):
    """Three sampled choices on three workers; the worker of choice 0 is killed mid-stream:
    its choices continue elsewhere and every choice equals an uninterrupted run."""
    deploy.start_frontend("--router", "round-robin")
    for _ in range(3):
        deploy.start_worker("--mocker-step-ms", "5")
    c = client(deploy)
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "the river runs to the sea"}],
        max_tokens=400,
        temperature=0.9,
        seed=11,
        n=3,
        logprobs=True,
        top_logprobs=2,
        extra_body=TOKEN_IDS,
    )
    want = c.chat.completions.create(**kw)
    got: dict[int, list[int]] = defaultdict(list)
    text: dict[int, str] = defaultdict(str)
    lps: dict[int, list] = defaultdict(list)
    stream = c.chat.completions.create(stream=True, extra_headers={"X-Request-Id": "n3-kill"}, **kw)
    victim = None
    for chunk in stream:
        for ch in chunk.choices:
            got[ch.index] += ch.model_extra.get("token_ids") or []
            text[ch.index] += ch.delta.content or ""
            lps[ch.index] += ch.logprobs.content if ch.logprobs else []
        if victim is None and len(got[0]) >= 10:
            victim = worker_of(deploy, "n3-kill-0")
            victim.signal(signal.SIGKILL)
    assert victim is not None
    for ch in want.choices:
        assert got[ch.index] == ids(ch) and text[ch.index] == ch.message.content
        assert lps[ch.index] == ch.logprobs.content  # logprobs exact across the move too
        assert len(ch.logprobs.content) == 400
    assert total_migrations(deploy) >= 1
    for w in deploy.workers:
        if w is not victim:
            wait_until(lambda w=w: metric(w, "segue_engine_running_requests") == 0, what="idle")


def test_cancelling_a_request_cancels_every_choice(deploy):
    deploy.start_frontend()
    for _ in range(2):
        deploy.start_worker("--mocker-step-ms", "20")
    c = client(deploy)
    stream = c.completions.create(
        model=MODEL, prompt="the sea", max_tokens=2000, n=4, stream=True,
        extra_headers={"X-Request-Id": "n4-cancel"},
    )  # fmt: skip
    seen: set[int] = set()
    for chunk in stream:
        seen.update(ch.index for ch in chunk.choices)
        if seen == {0, 1, 2, 3}:
            break
    stream.close()
    deploy.frontend.wait_log("Cancelled Request ID: n4-cancel")
    for w in deploy.workers:
        wait_until(
            lambda w=w: (
                metric(w, "segue_engine_running_requests") == 0
                and metric(w, "segue_engine_kv_blocks_used") == 0
            ),
            what="every choice aborted",
        )
    assert sum(metric(w, "segue_worker_aborts_total") for w in deploy.workers) == 4


def test_tokenize_and_detokenize_as_vllm(agg2):
    c = client(agg2)
    t = httpx.post(agg2.url + "/tokenize", json={"model": MODEL, "prompt": "the old mill"}).json()
    r = c.completions.create(model=MODEL, prompt="the old mill", max_tokens=1)
    assert t["count"] == len(t["tokens"]) == r.usage.prompt_tokens
    assert t["max_model_len"] > 0
    back = httpx.post(agg2.url + "/detokenize", json={"model": MODEL, "tokens": t["tokens"]})
    assert back.json() == {"prompt": "the old mill"}
    msgs = [{"role": "user", "content": "hello there"}]
    tm = httpx.post(agg2.url + "/tokenize", json={"model": MODEL, "messages": msgs}).json()
    chat = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    assert tm["count"] == chat.usage.prompt_tokens
    bad = httpx.post(agg2.url + "/tokenize", json={"model": "nope", "prompt": "x"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
    neither = httpx.post(agg2.url + "/tokenize", json={"model": MODEL})
    assert neither.status_code == 400
    big = httpx.post(agg2.url + "/detokenize", json={"model": MODEL, "tokens": [10**9]})
    assert big.status_code == 400 and big.json()["error"]["param"] == "tokens"


def test_stop_token_ids_end_the_choice(agg2):
    c = client(agg2)
    kw = dict(model=MODEL, prompt="a long road", max_tokens=10, temperature=0, extra_body=TOKEN_IDS)
    full = ids(c.completions.create(**kw).choices[0])
    stop = full[3]
    first = full.index(stop)  # the first time that token comes
    r = c.completions.create(**{**kw, "extra_body": {**TOKEN_IDS, "stop_token_ids": [stop]}})
    assert r.choices[0].finish_reason == "stop"
    assert ids(r.choices[0]) == full[: first + 1]


def test_tools_accepted_and_continuous_usage(agg2):
    c = client(agg2)
    tools = [{"type": "function", "function": {"name": "tide", "parameters": {"type": "object"}}}]
    r = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "when is high tide"}],
        tools=tools,
        tool_choice="auto",
        user="someone",
        metadata={"team": "ops"},
        max_tokens=4,
    )
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "yaml"},  # json_object and json_schema are served
        )
    assert e.value.body["param"] == "response_format"
    seen = [
        ch.usage.completion_tokens
        for ch in c.completions.create(
            model=MODEL,
            prompt="the sea",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
        if ch.choices
    ]
    assert seen == sorted(seen) and seen[-1] == 6 and seen[0] >= 1


def test_completion_logprobs_whole_and_streamed(agg2):
    c = client(agg2)
    kw = dict(model=MODEL, prompt="the old mill", max_tokens=8, temperature=0, logprobs=3)
    r = c.completions.create(**kw).choices[0]
    lp = r.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == r.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert -1 <= value < 0 and len(top) == 3
        assert top[tok] == value and max(top.values()) == value  # greedy: the most likely
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in c.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            if ch.logprobs:
                for key, values in streamed.items():
                    values += getattr(ch.logprobs, key)
    assert streamed == lp.model_dump(include=set(streamed))
    none = c.completions.create(model=MODEL, prompt="the old mill", max_tokens=2)
    assert none.choices[0].logprobs is None


def test_chat_logprobs_whole_and_streamed(agg2):
    c = client(agg2)
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "the sea"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    whole = c.chat.completions.create(**kw).choices[0]
    content = whole.logprobs.content
    assert "".join(t.token for t in content) == whole.message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    streamed = []
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            streamed += ch.logprobs.content if ch.logprobs else []
    assert streamed == content
    plain = c.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_min_tokens_and_penalties_on_the_mocker(agg2):
    """min_tokens bans stop tokens until then (the mocker draws again); penalties the mocker
    cannot apply are a 400 from the engine, not silently dropped."""
    c = client(agg2)
    kw = dict(model=MODEL, prompt="the sea", max_tokens=10, temperature=0, extra_body=TOKEN_IDS)
    full = ids(c.completions.create(**kw).choices[0])
    stop = full[1]
    early = c.completions.create(**{**kw, "extra_body": {**TOKEN_IDS, "stop_token_ids": [stop]}})
    assert ids(early.choices[0]) == full[:2] and early.choices[0].finish_reason == "stop"
    late = c.completions.create(
        **{**kw, "extra_body": {**TOKEN_IDS, "stop_token_ids": [stop], "min_tokens": 6}}
    ).choices[0]
    got = ids(late)
    assert got[0] == full[0] and stop not in got[:6] and len(got) >= 6
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(**{**kw, "presence_penalty": 0.5})
    assert "penalt" in e.value.body["message"]


def test_echo_with_logprobs_gives_the_prompts(agg2):
    c = client(agg2)
    prompt = "the old mill by the river"
    n_prompt = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1).usage.prompt_tokens
    kw = dict(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True)
    r = c.completions.create(**kw).choices[0]
    lp = r.logprobs
    assert len(lp.tokens) == n_prompt + 5 and "".join(lp.tokens) == r.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(-1 <= v < 0 for v in lp.token_logprobs[1:])
    plain = c.completions.create(**{**kw, "echo": False}).choices[0].logprobs
    assert lp.token_logprobs[n_prompt:] == plain.token_logprobs  # the output's unchanged
    streamed: list = []
    for chunk in c.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            streamed += ch.logprobs.token_logprobs if ch.logprobs else []
    assert streamed == lp.token_logprobs
