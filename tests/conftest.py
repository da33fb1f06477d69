from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Without a GPU, segue's Triton kernels run in Triton's interpreter (tests/engines/
# test_kernels.py). Triton reads this when it is first imported, which some test module may
# do at collection, so it is set here, first; the harness keeps it from child processes.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from harness import Deployment  # noqa: E402

# The tiers, by directory: `unit` runs in this process (fakes, no child processes), `engine`
# starts real hf/vLLM engines, `net` puts processes on hosts of their own (network
# namespaces, root only), `e2e` everything else (real mocker processes).
_TIER = {"unit": "unit", "engines": "engine", "net": "net"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        top = item.path.relative_to(TESTS).parts[0]
        item.add_marker(_TIER.get(top, "e2e"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the tail of segue's own log lines of every process it
    started: CI keeps only the report, and an engine's noise would bury the lines that
    explain a failure."""
    report = yield
    d = item.funcargs.get("deploy") if report.failed else None
    if isinstance(d, Deployment):
        for p in d.procs:
            try:
                text = p.log()
            except OSError:  # its temp dir is gone already
                continue
            lines = [x for x in text.splitlines() if " segue." in x]
            report.sections.append(
                (f"{p.name} (pid {p.pid}) segue log, last 40 lines", "\n".join(lines[-40:]))
            )
    return report


@pytest.fixture
def deploy(tmp_path):
    d = Deployment(tmp_path)
    yield d
    d.stop()


@pytest.fixture
def agg2(deploy):
    """Frontend (round-robin) + 2 fast mocker workers."""
    deploy.start_frontend()
    deploy.start_worker()
    deploy.start_worker()
    return deploy


@pytest.fixture
def hf_dir(tmp_path):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "model_max_length": 512,
                "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                "{{ m['content'] }}\n{% endfor %}[assistant] ",
            }
        )
    )
    return tmp_path
