"""transformers.pipeline over models with GOAT layers: the pipeline's answers are the model's own.

A GOAT model stays the transformers class it was, so pipeline() takes it as it is; these tests hold the pipelines'
pre- and post-processing (chat template, decoding, softmax, labels) to what the model computes directly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_classifier, train_like_
from instruct_fixtures import smollm2_tokenizer, tiny_instruct_llama
from transformers import AutoTokenizer, pipeline

from goat_hf import GoatConfig, disable_goat, get_goat_model
from goat_hf.tasks.assets import minilm_path

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def chat_tokenizer():
    return smollm2_tokenizer()


def greedy_text(model, tokenizer, inputs: dict[str, torch.Tensor]) -> str:
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_text_generation_pipeline_equals_generate(chat_tokenizer):
    model = train_like_(get_goat_model(tiny_instruct_llama(chat_tokenizer), GoatConfig(r=8, num_experts=4)))
    generator = pipeline("text-generation", model=model, tokenizer=chat_tokenizer)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False)

    prompt = "The capital of France is"
    text = generator(prompt, return_full_text=False, **settings)[0]["generated_text"]
    assert text == greedy_text(model, chat_tokenizer, chat_tokenizer(prompt, return_tensors="pt"))

    messages = [{"role": "user", "content": "Is 2 + 2 equal to 4?"}]
    reply = generator(messages, **settings)[0]["generated_text"][-1]
    inputs = chat_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    expected = greedy_text(model, chat_tokenizer, inputs)
    assert reply == {"role": "assistant", "content": expected}
    with disable_goat(model):
        assert greedy_text(model, chat_tokenizer, inputs) != expected  # the adapter is what answers


def test_text_classification_pipeline_equals_the_models_softmax():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    base = tiny_classifier(
        num_labels=3, vocab_size=len(tokenizer), id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    model = train_like_(get_goat_model(base, GoatConfig(r=8, num_experts=4)))  # the head is trained too
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    texts = ["a film I would watch again", "the plot made no sense at all, and it went on for hours"]
    for text, scores in zip(texts, classifier(texts), strict=True):
        with torch.no_grad():
            probabilities = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
        by_label = {item["label"]: item["score"] for item in scores}
        assert by_label.keys() == set(labels.values())
        expected = [probabilities[i].item() for i in labels]
        assert [by_label[labels[i]] for i in labels] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert scores[0]["label"] == labels[int(probabilities.argmax())]  # sorted, best first
    with torch.no_grad(), disable_goat(model):  # the adapter and its trained head change the scores
        base_probabilities = model(**tokenizer(texts[1], return_tensors="pt")).logits.softmax(-1)[0]
    assert not torch.allclose(base_probabilities, probabilities)
