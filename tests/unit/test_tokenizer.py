from __future__ import annotations

from tokenizers import Tokenizer

from segue.frontend.output import IncrementalDetokenizer, StopChecker
from segue.tokenizer import BuiltinTokenizer, HFTokenizer


def test_builtin_roundtrip_any_text():
    tok = BuiltinTokenizer()
    for text in ["the cat sat", "Hello, wörld! 🎉 日本", "  spaces\tand\nlines ", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the cat and the dog")) == 5


def test_incremental_detok_never_emits_broken_utf8():
    tok = BuiltinTokenizer()
    text = "the 🎉 and 日本 cat"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    out = []
    for i in ids:  # one token at a time: multi-byte characters arrive in pieces
        delta = d.add([i])
        assert "\ufffd" not in delta
        out.append(delta)
    out.append(d.flush())
    assert "".join(out) == text


def test_stop_checker_finds_stop_across_deltas():
    s = StopChecker(["STOP"])
    pieces = [s.feed(x) for x in ("abc ST", "O", "P tail")]
    assert "".join(p[0] for p in pieces) == "abc "
    assert pieces[-1][1] is True


def test_stop_checker_flush_releases_held_text():
    s = StopChecker(["xyz"])
    sent, hit = s.feed("hello x")
    assert not hit and sent + s.flush() == "hello x"


def test_hf_tokenizer_directory(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert tok.context_length == 512
    assert tok.eos_token_ids == {2}
    text = tok.apply_chat_template([{"role": "user", "content": "the fox"}])
    assert text == "<s>[user] the fox\n[assistant] "
    ids = tok.encode("the lazy dog 🎉")
    lib = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))  # its plain encode, offsets and all
    for text in ("the lazy dog 🎉", "", "<s>the fox</s> over", "  spaced\n\tout  "):
        for special in (True, False):
            want = lib.encode(text, add_special_tokens=special).ids
            assert tok.encode(text, add_special_tokens=special) == want
    d = IncrementalDetokenizer(tok)
    out = "".join(d.add([i]) for i in ids) + d.flush()
    assert out == "the lazy dog 🎉"
    vocab = tok.output_vocab()
    assert vocab and 2 not in vocab
