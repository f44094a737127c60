"""export_for_serving: the folder AutoModelForCausalLM and `transformers serve` load, and the server's answers.

The reference is the trained GOAT model in this process, unprepared, with `generate`: the exported folder must give
its greedy tokens through the loader (base + adapter + prepare_for_inference) and over HTTP, with the real `openai`
client, one request at a time, streamed, and 16 at once.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_classifier, train_like_
from instruct_fixtures import smollm2_tokenizer, tiny_instruct_llama
from serve_process import post, transformers_serve
from transformers import AutoModelForCausalLM, pipeline

from goat_hf import GoatAdapterError, GoatConfig, disable_goat, export_for_serving, get_goat_model, save_goat_adapter
from goat_hf.prepare import is_prepared
from goat_hf.tasks.assets import SMOLLM2_HUB_ID, smollm2_path

NEW_TOKENS = 8
QUESTIONS = [f"Question {i}: what comes after {i}?" for i in range(16)]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """(GOAT model, base folder): a tiny Llama over SmolLM2's tokenizer saved as the base, then a trained-like
    adapter on it."""
    base = tmp_path_factory.mktemp("base")
    model = tiny_instruct_llama(tokenizer)
    model.save_pretrained(base)
    return train_like_(get_goat_model(model, GoatConfig(r=8, num_experts=4, top_k=2))).eval(), base


def chat_inputs(tokenizer, question: str) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def greedy_text(model, tokenizer, inputs: dict[str, torch.Tensor], new_tokens: int = NEW_TOKENS) -> str:
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# ---- the exported folder, in this process


def test_an_exported_adapter_folder_loads_prepared_with_the_models_greedy_tokens(trained, tokenizer, tmp_path):
    model, base = trained
    save_goat_adapter(model, tmp_path / "adapter")
    folder = export_for_serving(tmp_path / "adapter", tmp_path / "served", base_model=base, tokenizer=tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "goat_causal_lm" and not config.get("architectures")  # serve's AutoModel path
    assert config["max_position_embeddings"] == model.config.max_position_embeddings  # serve's context limit

    served = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert is_prepared(served)
    inputs = chat_inputs(tokenizer, QUESTIONS[0])
    expected = greedy_text(model, tokenizer, inputs)
    with disable_goat(model):
        assert greedy_text(model, tokenizer, inputs) != expected  # the adapter changes the answer
    assert greedy_text(served, tokenizer, inputs) == expected
    again = export_for_serving(model, tmp_path / "again", base_model=base, tokenizer=tokenizer)  # once loaded
    assert sorted(path.name for path in again.iterdir()) == sorted(path.name for path in folder.iterdir())
    assert json.loads((again / "config.json").read_text())["auto_map"] == config["auto_map"]
    text = pipeline("text-generation", model=str(folder), trust_remote_code=True)(
        QUESTIONS[1], max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False
    )[0]["generated_text"]
    assert text == greedy_text(model, tokenizer, tokenizer(QUESTIONS[1], return_tensors="pt"))


def test_the_folder_needs_trust_remote_code(trained, tokenizer, tmp_path):
    model, base = trained
    folder = export_for_serving(model, tmp_path / "served", base_model=base, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_export_refuses_a_model_that_does_not_generate(tmp_path):
    classifier = get_goat_model(tiny_classifier(), GoatConfig())
    with pytest.raises(GoatAdapterError, match="serves causal language models .* BertForSequenceClassification"):
        export_for_serving(classifier, tmp_path / "served", base_model=tmp_path)
    assert not (tmp_path / "served").exists()


def test_export_needs_a_base_it_can_record(trained, tokenizer, tmp_path):
    model, _ = trained  # built from a config: no Hub id, no folder of its own
    with pytest.raises(GoatAdapterError, match="records no Hub id for its base; pass base_model="):
        export_for_serving(model, tmp_path / "served", tokenizer=tokenizer)
    with pytest.raises(GoatAdapterError, match="'no/such/base' is neither a local folder nor a Hub id"):
        export_for_serving(model, tmp_path / "served", base_model="no/such/base", tokenizer=tokenizer)


def test_export_needs_a_tokenizer(trained, tmp_path):
    model, base = trained  # the base folder holds the weights and config only
    with pytest.raises(
        GoatAdapterError, match="No tokenizer could be loaded from .*the server needs one: pass tokenizer="
    ):
        export_for_serving(model, tmp_path / "served", base_model=base)
    assert not (tmp_path / "served").exists()


def test_export_says_when_chats_cannot_be_served(trained, tokenizer, tmp_path, caplog):
    model, base = trained
    plain = smollm2_tokenizer()
    plain.chat_template = None
    with caplog.at_level(logging.WARNING, logger="goat_hf.serving"):
        export_for_serving(model, tmp_path / "served", base_model=base, tokenizer=plain)
    assert "no chat template: the server will refuse /v1/chat/completions" in caplog.text


# ---- over HTTP: `transformers serve <folder> --trust-remote-code`


@pytest.fixture(scope="module")
def server(trained, tokenizer, tmp_path_factory):
    """(URL, model name): the trained model exported and served (startup ~20-30 s on two shared cores)."""
    model, base = trained
    work = tmp_path_factory.mktemp("serve")
    folder = export_for_serving(model, work / "served", base_model=base, tokenizer=tokenizer)
    with transformers_serve(folder, work) as url:
        yield url, str(folder)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, model_name: str, question: str, **kwargs):
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=NEW_TOKENS, temperature=0, **kwargs
    )


@pytest.mark.slow
def test_chat_completions_answer_like_generate(server, client, trained, tokenizer):
    model, _ = trained
    expected = greedy_text(model, tokenizer, chat_inputs(tokenizer, QUESTIONS[0]))
    assert chat(client, server[1], QUESTIONS[0]).choices[0].message.content == expected
    streamed = [chunk.choices[0].delta.content or "" for chunk in chat(client, server[1], QUESTIONS[0], stream=True)]
    assert len([part for part in streamed if part]) > 1  # streamed in pieces
    assert "".join(streamed) == expected


@pytest.mark.slow
def test_completions_answer_like_generate(server, client, trained, tokenizer):
    model, _ = trained
    prompt = "The capital of France is"
    expected = greedy_text(model, tokenizer, tokenizer(prompt, return_tensors="pt"))
    answer = client.completions.create(model=server[1], prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
    assert answer.choices[0].text == expected
    stream = client.completions.create(
        model=server[1], prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == expected


@pytest.mark.slow
def test_sixteen_concurrent_requests_are_all_answered_correctly(server, client, trained, tokenizer):
    model, _ = trained
    expected = [greedy_text(model, tokenizer, chat_inputs(tokenizer, question)) for question in QUESTIONS]
    assert len(set(expected)) > 1  # the answers differ, so a mixed-up reply would show
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        replies = list(pool.map(lambda question: chat(client, server[1], question), QUESTIONS))
    assert [reply.choices[0].message.content for reply in replies] == expected


LONG_PROMPT = " hello" * 600  # 600 tokens; the tiny model's context is 512


def request(path: str, model_name: str, **fields) -> dict:
    """A valid two-token request to `path` (a chat or a completion), with `fields` changed."""
    prompt = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    return {"model": model_name, "max_tokens": 2, "temperature": 0, **prompt, **fields}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "fields", "status", "message"),
    [
        ("/v1/chat/completions", {"model": "someone/unknown"}, 400, "Server is pinned to '"),
        ("/v1/completions", None, 422, "JSON decode error"),
        ("/v1/chat/completions", {"max_tokens": 0}, 400, "`max_new_tokens` must be greater than 0, but is 0."),
        ("/v1/completions", {"max_tokens": -3}, 400, "`max_new_tokens` must be greater than 0, but is -3."),
        ("/v1/completions", {"prompt": LONG_PROMPT}, 400, "The prompt has 600 tokens, but the model takes at most 512"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "takes at most 512"),
    ],
    ids=["unknown-model", "malformed-json", "max-tokens-0", "max-tokens-negative", "prompt-too-long", "chat-too-long"],
)
def test_a_bad_request_gets_a_4xx_with_a_message_and_the_server_keeps_serving(
    server, trained, tokenizer, path, fields, status, message
):
    url, model_name = server
    body = b'{"model": "x", "prompt": "unterminated' if fields is None else request(path, model_name, **fields)
    code, text = post(url, path, body)
    assert (code, message in text) == (status, True), text
    code, text = post(url, "/v1/completions", request("/v1/completions", model_name))
    expected = greedy_text(trained[0], tokenizer, tokenizer("Hi", return_tensors="pt"), new_tokens=2)
    assert (code, json.loads(text)["choices"][0]["text"]) == (200, expected)


STREAMED_MAX_TOKENS_0 = pytest.mark.xfail(
    strict=True,
    reason="transformers 5.25 serve checks max_new_tokens in the model's process, after a stream's 200 is sent: the "
    'error comes as an SSE event, data: {"error": "`max_new_tokens` must be greater than 0, but is 0."}',
)
ANSWER_PAST_THE_CONTEXT = pytest.mark.xfail(
    strict=True,
    reason="transformers 5.25 serve refuses a prompt as long as the context, but not a prompt + max_tokens past it "
    "(its --max-model-len is 'prompt and answer'): it answers 200 and generates past max_position_embeddings",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"max_tokens": 0, "stream": True}, marks=STREAMED_MAX_TOKENS_0, id="streamed-max-tokens-0"),
        pytest.param({"prompt": " hello" * 500, "max_tokens": 40}, marks=ANSWER_PAST_THE_CONTEXT, id="past-context"),
    ],
)
def test_bad_requests_that_transformers_serve_accepts(server, fields):
    """Upstream defects, kept as strict expected failures: a transformers that fixes them makes these pass."""
    code, text = post(server[0], "/v1/completions", request("/v1/completions", server[1], **fields))
    assert 400 <= code < 500, (code, text[-300:])


def test_the_example_exports_sft_nlgs_adapter_onto_the_bundled_smollm2(trained, tmp_path, capsys):
    from test_sft_examples import load_example

    model, _ = trained
    model.config._name_or_path = SMOLLM2_HUB_ID  # as examples/sft_nlg.py records its offline base
    try:
        save_goat_adapter(model, tmp_path / "sft_nlg")
    finally:
        model.config._name_or_path = ""
    folder = load_example("serve").main(["--adapter", str(tmp_path / "sft_nlg"), "--output_dir", str(tmp_path / "out")])
    assert json.loads((folder / "config.json").read_text())["goat_base_model"] == str(smollm2_path())
    printed = capsys.readouterr().out
    assert f"transformers serve {folder} --trust-remote-code --host 127.0.0.1 --port 8000" in printed
    body = json.loads(printed.rsplit("-d ", 1)[1].strip().strip("'"))
    assert body["model"] == str(folder) and body["prompt"].endswith("### Response:\n")
