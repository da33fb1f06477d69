"""The batched paged hf engine in process: its forward pass against transformers', greedy
output against `generate()` with many sequences batched, chunked prefill, aborts freeing
blocks, and KV moved between two engines' pools. Runs on a GPU too (CUDA graphs there)."""

from __future__ import annotations

import asyncio

import pytest

from segue.engines.base import EngineFinish, EngineInput, EngineTask
from segue.sampling import SamplingParams

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from segue.models.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("paged-llama"), seed=3))


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()


NO_EOS = SamplingParams(ignore_eos=True)


def prompts(n: int, base: int = 5) -> list[list[int]]:
    """Prompts of different lengths (3 .. 60 tokens) so batches are ragged."""
    return [
        [(base + 7 * i + 13 * j) % 1000 + 3 for j in range(3 + (i * 11) % 58)] for i in range(n)
    ]


def decode_input(rid: str, ids: list[int], n: int, payload: bytes) -> EngineInput:
    return EngineInput(rid, ids, n, NO_EOS, task=EngineTask.DECODE, kv_payload=payload)


def generate(reference, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([ids], device=DEVICE), max_new_tokens=n, do_sample=False
        )
    return out[0, len(ids) :].tolist()


async def started(model_dir, overlap: str = "auto", **cfg):
    """An hf engine, started. `overlap` "buckets": on, and every step padded to its shape
    bucket and fed from fixed buffers as a GPU's CUDA graphs are (run eagerly on a CPU);
    "kernels": the same through segue's Triton kernels, as on a GPU."""
    from segue.engines.hf import HFConfig, HFEngine
    from segue.tokenizer import HFTokenizer

    how = "on" if overlap in ("buckets", "kernels") else overlap
    if overlap == "kernels":
        cfg["kernels"] = "triton"
        overlap = "buckets"
    cfg = HFConfig(model_dir=model_dir, device=DEVICE, overlap=how, **cfg)
    engine = HFEngine(cfg, HFTokenizer(model_dir))
    await engine.start()
    if overlap == "buckets" and not engine.paged.layout.bucketed:
        engine.paged.bucket_steps(capture=False)  # before any request: the thread idles
    return engine


async def run_engine(model_dir, reqs: list[EngineInput], **cfg) -> tuple[dict, object]:
    engine = await started(model_dir, **cfg)
    try:
        streams = {r.request_id: engine.add_request(r) for r in reqs}
        out: dict[str, tuple[list[int], EngineFinish | None]] = {}
        for rid, s in streams.items():
            toks: list[int] = []
            while True:
                o = await s.get(30)
                assert o is not None, f"{rid} made no progress"
                toks += o.token_ids
                if o.finish_reason is not None:
                    out[rid] = (toks, o.finish_reason)
                    break
        stats = engine.stats()
        return out, stats
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("bucketed", "kernels"), [(False, "torch"), (True, "torch"), (True, "triton")]
)
def test_paged_forward_matches_transformers(model_dir, reference, bucketed, kernels):
    """Logits of a ragged batch (prefill chunks at different offsets, then decode steps)
    equal transformers' forward of each sequence alone; also with steps padded to shape
    buckets from fixed buffers (3 rows -> 4, chunks -> 16 or 32 tokens, 2-4 blocks -> 8),
    and through segue's kernels (the second chunks read the first ones' blocks in place)."""
    from segue.engines.paged import PagedModel

    paged = PagedModel(reference, 64, 16, 8, 4, cuda_graphs=False, kernels=kernels)
    assert paged.kernel == (kernels == "triton")
    if bucketed:
        paged.bucket_steps(capture=False)
    seqs = prompts(3)
    tables = [[i * 8 + b for b in range(8)] for i in range(3)]
    with torch.inference_mode():
        # first chunk of each, then the rest in a second (ragged) chunk
        half = [len(s) // 2 for s in seqs]
        paged.prefill([(s[:h], 0, t) for s, h, t in zip(seqs, half, tables, strict=True)])
        got, _ = paged.prefill([(s[h:], h, t) for s, h, t in zip(seqs, half, tables, strict=True)])
        nxt = got.argmax(-1).tolist()
        dec = paged.decode([(x, len(s), t) for x, s, t in zip(nxt, seqs, tables, strict=True)])
        for i, s in enumerate(seqs):
            want = reference(torch.tensor([s + [nxt[i]]], device=DEVICE)).logits[0].float()
            torch.testing.assert_close(got[i], want[-2], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(dec[i], want[-1], rtol=1e-4, atol=1e-4)


# "on": each step launched before the one before it is handled (a GPU's default), which
# feeds a token still on the device to the next step and runs one step past a stop token
OVERLAP = pytest.mark.parametrize("overlap", ["off", "on", "buckets"])


@pytest.mark.parametrize("overlap", ["off", "on", "buckets", "kernels"])
def test_batched_greedy_equals_generate_and_frees_blocks(model_dir, reference, overlap):
    """Twelve ragged requests, eight running at once, prompts chunked 16 tokens per step:
    each one's tokens equal `generate()` of it alone; all blocks back after."""
    ps = prompts(12)
    reqs = [EngineInput(f"r{i}", p, max_tokens=20, sampling=NO_EOS) for i, p in enumerate(ps)]
    out, stats = asyncio.run(
        run_engine(model_dir, reqs, max_num_seqs=8, max_batched_tokens=16, overlap=overlap)
    )
    for i, p in enumerate(ps):
        toks, reason = out[f"r{i}"]
        assert reason is EngineFinish.LENGTH
        assert toks == generate(reference, p, 20), f"request {i}"
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


@OVERLAP
def test_a_stop_token_ends_the_request_where_generate_has_it(model_dir, reference, overlap):
    """Each request stops at the first token of its own that it was told to stop at: with
    overlap the step after it already runs and its token must not reach the stream; a
    greedy request beside them that asks for logprobs (its token chosen on the CPU, so its
    steps complete at once) is unchanged."""
    ps = prompts(6, base=11)
    reqs, wants = [], {}
    for i, p in enumerate(ps[:5]):
        full = generate(reference, p, 16)
        stop = full[3 + i]  # a token it makes, stopped at its first occurrence
        wants[f"s{i}"] = full[: full.index(stop) + 1]
        sp = SamplingParams(ignore_eos=True, stop_token_ids=[stop])
        reqs.append(EngineInput(f"s{i}", p, 16, sp))
    plain = generate(reference, ps[5], 12)
    reqs.append(EngineInput("g", ps[5], 12, SamplingParams(ignore_eos=True, logprobs=2)))
    out, stats = asyncio.run(run_engine(model_dir, reqs, max_num_seqs=8, overlap=overlap))
    for rid, want in wants.items():
        assert out[rid] == (want, EngineFinish.STOP), rid
    assert out["g"] == (plain, EngineFinish.LENGTH)
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_cache_reuses_blocks_and_the_output_is_unchanged(model_dir, reference, caching):
    """A second prompt that starts with the first one's context is served from its cached
    blocks (all but the block of its last token): its tokens still equal `generate()`, the
    engine counts the cache hits, and it reports the blocks it caches as KV events (named
    as the mocker and the frontend's KV index name them)."""
    from segue.blocks import block_hashes
    from segue.engines.hf import HFConfig, HFEngine
    from segue.tokenizer import HFTokenizer

    class Sink:
        def __init__(self) -> None:
            self.stored_: list[int] = []
            self.removed_: list[int] = []

        def start(self, block_size, capacity, blocks) -> None:
            assert (block_size, blocks) == (16, [])

        def stored(self, hashes: list[int]) -> None:
            self.stored_ += hashes

        def removed(self, hashes: list[int]) -> None:
            self.removed_ += hashes

    sink = Sink()
    first = [(5 + 13 * j) % 1000 + 3 for j in range(40)]

    async def one(engine, rid: str, ids: list[int]) -> tuple[list[int], int]:
        s = engine.add_request(EngineInput(rid, ids, 10, NO_EOS))
        toks: list[int] = []
        while (o := await s.get(30)) is not None:
            toks += o.token_ids
            if o.finish_reason is not None:
                return toks, s.cached_tokens
        raise AssertionError("no finish")

    async def go():
        cfg = HFConfig(model_dir=model_dir, device=DEVICE, prefix_caching=caching)
        engine = HFEngine(cfg, HFTokenizer(model_dir))
        await engine.start()
        try:
            assert engine.publish_kv_events(sink) is caching
            out_a, hit_a = await one(engine, "a", first)
            second = first + out_a + list(range(7, 20))
            out_b, hit_b = await one(engine, "b", second)
            await asyncio.sleep(0)  # events come through the loop
            return out_a, hit_a, out_b, hit_b, engine.stats()
        finally:
            await engine.stop()

    out_a, hit_a, out_b, hit_b, stats = asyncio.run(go())
    assert out_a == generate(reference, first, 10)
    second = first + out_a + list(range(7, 20))  # 63 tokens
    assert out_b == generate(reference, second, 10)
    # a computed 49 tokens (not its last): 3 full blocks; b reuses them
    assert hit_a == 0 and hit_b == (48 if caching else 0)
    assert stats.prompt_tokens["local_cache_hit"] == hit_b
    assert stats.prompt_tokens["computed"] == 40 + len(second) - hit_b
    assert (stats.running, stats.kv_blocks_used) == (0, 0)
    if caching:  # and b's 72 computed fill a 4th, chained on from them
        assert sink.stored_ == block_hashes((second + out_b)[:64], 16)
        assert sink.removed_ == []


@OVERLAP
def test_abort_frees_blocks_at_once(model_dir, overlap):
    async def go():
        engine = await started(model_dir, overlap)
        try:
            a = engine.add_request(EngineInput("a", prompts(1)[0], 1500, NO_EOS))
            b = engine.add_request(EngineInput("b", prompts(2)[1], 8, NO_EOS))
            first = await a.get(30)
            assert first is not None and first.token_ids
            assert engine.stats().kv_blocks_used > 0
            assert engine.abort("a")
            assert engine.stats().running <= 1
            while (o := await b.get(30)) is not None and o.finish_reason is None:
                pass
            assert o is not None and o.finish_reason is EngineFinish.LENGTH
            s = engine.stats()
            assert (s.running, s.kv_blocks_used) == (0, 0)
            assert engine.table.free == engine.cfg.kv_blocks  # cached blocks count as free
        finally:
            await engine.stop()

    asyncio.run(go())


@OVERLAP
def test_kv_moves_between_pools_exactly(model_dir, reference, overlap):
    """A PREFILL on one engine, its payload pulled into a DECODE on another: the tokens
    equal generate(); a running request exported mid-stream continues exactly too."""
    ids = prompts(5)[4]
    want = generate(reference, ids, 24)

    async def drain(s) -> tuple[list[int], EngineFinish | None]:
        toks: list[int] = []
        while True:
            o = await s.get(30)
            assert o is not None
            toks += o.token_ids
            if o.finish_reason is not None:
                return toks, o.finish_reason

    async def go():
        a = await started(model_dir, overlap)
        b = await started(model_dir, overlap)
        try:
            s = a.add_request(EngineInput("p", ids, 24, NO_EOS, task=EngineTask.PREFILL))
            assert await drain(s) == ([], EngineFinish.PREFILLED)
            payload = a.kv_payload(s.kv_key)
            assert len(payload) > a.kv_nbytes(s.kv_key) > 0
            assert a.release_kv(s.kv_key) and a.stats().kv_blocks_used == 0
            d = b.add_request(decode_input("d", ids, 24, payload))
            assert await drain(d) == (want, EngineFinish.LENGTH)
            # live export after some tokens, import on the other engine
            r = a.add_request(EngineInput("r", ids, 24, NO_EOS))
            first = await r.get(30)
            assert first is not None
            assert a.export("r")
            rest, reason = await drain(r)
            assert reason is EngineFinish.EXPORTED
            done = first.token_ids + rest
            ctx = r.kv_tokens
            assert ctx == ids + done
            moved = a.kv_payload(r.kv_key)
            a.release_kv(r.kv_key)
            m = b.add_request(decode_input("m", ctx, 24 - len(done), moved))
            tail, reason = await drain(m)
            assert done + tail == want and reason is EngineFinish.LENGTH
            with pytest.raises(ValueError, match="does not belong"):
                b.add_request(decode_input("x", ids[:-1], 4, moved))
            for e in (a, b):
                st = e.stats()
                assert (st.running, st.kv_blocks_used, st.held) == (0, 0, 0)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(go())


def test_logprobs_are_the_models(model_dir, reference):
    """Each token's logprob and top 3 equal log_softmax of transformers' logits there; so
    do the prompt's (echo), computed over several prompt chunks."""
    ids = prompts(3)[2]
    req = EngineInput("lp", ids, 6, SamplingParams(ignore_eos=True, logprobs=3), prompt_logprobs=2)

    async def go():
        from segue.engines.hf import HFConfig, HFEngine
        from segue.tokenizer import HFTokenizer

        # prompt chunks of 5 tokens: the prompt's logprobs come from several steps
        cfg = HFConfig(model_dir=model_dir, device=DEVICE, max_batched_tokens=5)
        engine = HFEngine(cfg, HFTokenizer(model_dir))
        await engine.start()
        try:
            s = engine.add_request(req)
            toks, lps, prompt_lps = [], [], None
            while True:
                o = await s.get(30)
                assert o is not None
                toks += o.token_ids
                lps += o.logprobs or []
                if o.prompt_logprobs is not None:
                    assert prompt_lps is None and not toks[: -len(o.token_ids)]  # first
                    prompt_lps = o.prompt_logprobs
                if o.finish_reason is not None:
                    return toks, lps, prompt_lps
        finally:
            await engine.stop()

    toks, lps, prompt_lps = asyncio.run(go())
    assert len(lps) == len(toks) == 6
    with torch.inference_mode():
        plogits = reference(torch.tensor([ids], device=DEVICE)).logits[0].float()
    pwant = torch.log_softmax(plogits, -1)
    assert prompt_lps is not None and len(prompt_lps) == len(ids) and prompt_lps[0] is None
    for p in range(1, len(ids)):
        got = prompt_lps[p]
        assert got is not None
        assert got.logprob == pytest.approx(float(pwant[p - 1, ids[p]]), abs=1e-4)
        assert got.top_ids == pwant[p - 1].topk(2).indices.tolist()
    with torch.inference_mode():
        logits = reference(torch.tensor([ids + toks], device=DEVICE)).logits[0].float()
    want = torch.log_softmax(logits, -1)[len(ids) - 1 : -1]
    for i, (tok, lp) in enumerate(zip(toks, lps, strict=True)):
        top = want[i].topk(3)
        assert lp.top_ids == top.indices.tolist() and lp.top_ids[0] == tok  # greedy
        assert lp.logprob == pytest.approx(float(want[i, tok]), abs=1e-4)
        assert lp.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)


def test_penalties_and_min_tokens_hold_across_a_migration(model_dir, reference):
    """repetition_penalty as transformers applies it; presence and frequency penalties and
    min_tokens see a migrated request's earlier output as generated: a request continued
    from its first 5 tokens ends as the uninterrupted one."""
    ids = prompts(4)[3]
    with torch.inference_mode():
        want = reference.generate(
            torch.tensor([ids], device=DEVICE),
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.3,
        )[0, len(ids) :].tolist()
    kw = dict(ignore_eos=True, frequency_penalty=0.7, presence_penalty=0.4, min_tokens=8)
    plain = asyncio.run(
        run_engine(
            model_dir,
            [EngineInput("p", ids, 12, SamplingParams(repetition_penalty=1.3, ignore_eos=True))],
        )
    )[0]
    assert plain["p"][0] == want
    penalized = [EngineInput("a", ids, 12, SamplingParams(**kw))]
    first = asyncio.run(run_engine(model_dir, penalized))[0]["a"][0]
    stop = first[1]  # as a stop token it is banned there, before min_tokens
    full = asyncio.run(
        run_engine(
            model_dir, [EngineInput("f", ids, 12, SamplingParams(stop_token_ids=[stop], **kw))]
        )
    )[0]["f"][0]
    assert full[0] == first[0] and full[1] != stop  # the ban changed the second token
    assert stop not in full[:8] and len(full) >= 8
    head = full[:5]
    rest = asyncio.run(
        run_engine(
            model_dir,
            [
                EngineInput(
                    "m",
                    ids + head,
                    12 - 5,
                    SamplingParams(stop_token_ids=[stop], **kw),
                    generated=5,
                )
            ],
        )
    )[0]["m"][0]
    assert head + rest == full


def test_sampled_requests_draw_the_same_in_any_batch_and_after_a_migration(model_dir):
    """Requests with a temperature (and top_p) are drawn on the device, seeded by request
    and position: the same tokens alone, batched with others, with steps overlapped or not,
    with min_tokens (chosen on the CPU) and continued from their 6th token; a top_p too small
    to keep more than the likeliest token gives the greedy answer; different seeds differ."""
    ps = prompts(6, base=21)

    def sp(i: int, **kw) -> SamplingParams:
        return SamplingParams(temperature=0.9, top_p=0.95, seed=1000 + i, ignore_eos=True, **kw)

    reqs = [EngineInput(f"s{i}", p, 14, sp(i)) for i, p in enumerate(ps)]
    alone = {
        r.request_id: asyncio.run(run_engine(model_dir, [r], max_num_seqs=1, overlap="off"))[0][
            r.request_id
        ][0]
        for r in reqs[:2]
    }
    for overlap in ("off", "on"):
        out, stats = asyncio.run(run_engine(model_dir, reqs, max_num_seqs=8, overlap=overlap))
        assert {rid: out[rid][0] for rid in alone} == alone, overlap
        assert len({tuple(t) for t, _ in out.values()}) == len(reqs)  # seeds differ
        assert (stats.running, stats.kv_blocks_used) == (0, 0)
    # min_tokens of 3 (already reached after the 3rd token): the CPU's choice, same draw
    cpu = asyncio.run(run_engine(model_dir, [EngineInput("c", ps[0], 14, sp(0, min_tokens=3))]))
    assert cpu[0]["c"][0] == alone["s0"]
    head = alone["s1"][:6]
    moved = EngineInput("m", ps[1] + head, 8, sp(1), generated=6)
    rest = asyncio.run(run_engine(model_dir, [moved], overlap="on"))[0]["m"][0]
    assert head + rest == alone["s1"]
    greedy = asyncio.run(run_engine(model_dir, [EngineInput("g", ps[2], 14, NO_EOS)]))[0]["g"][0]
    tight = EngineInput("t", ps[2], 14, SamplingParams(temperature=2.0, top_p=1e-6, seed=5))
    assert asyncio.run(run_engine(model_dir, [tight], overlap="on"))[0]["t"][0] == greedy


def test_a_seeded_draw_follows_the_softmax():
    """4,000 draws over four logits with 4,000 seeds land in proportion to softmax(x / T)
    and, cut to top_p, only among the likeliest tokens whose mass reaches it."""
    from segue.engines import sampler

    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 4000)
    keys = sampler.row_keys(torch.tensor(sampler.key_parts(list(range(4000)), [17] * 4000)))
    ones = torch.ones(4000)
    for temp in (1.0, 2.0):
        toks = sampler.sample_rows(torch, x, ones * temp, ones, keys, False)
        freq = torch.bincount(toks, minlength=4).float() / 4000
        torch.testing.assert_close(freq, torch.softmax(x[0] / temp, 0), atol=0.03, rtol=0)
    # softmax: 0.03, 0.09, 0.24, 0.64; top_p 0.8: 0.64 < 0.8, so the 3rd is kept, not the 2nd
    toks = sampler.sample_rows(torch, x, ones, ones * 0.8, keys, True)
    assert set(toks.tolist()) == {2, 3}


def test_constrained_decoding_is_valid_and_resumes_exactly(model_dir):
    """The grammar masks the whole batch's logits (random weights: only the mask makes
    the output JSON); a request resumed after k of its tokens (a migration) makes the
    same tokens, its matcher advanced over those k first."""
    import json

    pytest.importorskip("xgrammar")
    from segue.sampling import Constraint, ConstraintKind
    from segue.tokenizer import HFTokenizer

    tok = HFTokenizer(model_dir)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
        "required": ["ok", "n"],
    }
    c = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))
    ids = prompts(3)[2]
    plain = EngineInput("plain", ids, 30)  # batched with the constrained ones, unmasked
    greedy = EngineInput("g", ids, 60, SamplingParams(constraint=c))
    sampled = EngineInput("s", ids, 60, SamplingParams(constraint=c, temperature=1.0, seed=4))
    out, stats = asyncio.run(run_engine(model_dir, [plain, greedy, sampled]))
    assert stats.running == 0 and stats.kv_blocks_used == 0
    for rid in ("g", "s"):
        toks, finish = out[rid]
        assert finish == EngineFinish.STOP, (rid, tok.decode(toks))
        doc = json.loads(tok.decode(toks))
        assert set(doc) == {"ok", "n"} and isinstance(doc["ok"], bool)
    toks = out["s"][0]
    for k in (1, len(toks) // 2, len(toks) - 1):
        sp = SamplingParams(constraint=c, temperature=1.0, seed=4)
        rest = asyncio.run(
            run_engine(model_dir, [EngineInput("m", ids + toks[:k], 60 - k, sp, generated=k)])
        )[0]["m"][0]
        assert toks[:k] + rest == toks, k


def test_make_model_builds_the_shape_asked_for(tmp_path):
    """--kv-heads, --intermediate-size, --context-length, and a --vocab-size beyond what
    the tokenizer's corpus yields: the model has that many rows, and each extra id decodes
    to text."""
    import json

    from segue.models.tiny import build_tiny_llama
    from segue.tokenizer import HFTokenizer

    path = build_tiny_llama(
        tmp_path / "m",
        vocab_size=3000,
        heads=4,
        kv_heads=2,
        intermediate_size=96,
        max_positions=5000,
    )
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (
        3000,
        2,
        96,
    )
    tok = HFTokenizer(str(path))
    assert (tok.vocab_size, tok.context_length) == (3000, 5000)
    assert cfg["max_position_embeddings"] == 5000
    assert tok.decode([2999]) == "<x2999>"
    assert max(tok.encode("the river and the sea")) < 1100  # no merge makes an extra id
