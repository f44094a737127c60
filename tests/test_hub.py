"""Hub sharing against a local Hub server: push -> load round trips, the card, revisions, the trainer's pushes,
offline loads from the cache, clear errors, and a token that never reaches a file or a log line."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, perturb_, tiny_llama, token_batch
from hub_server import LocalHub
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import _http
from PIL import Image
from transformers import LlamaForCausalLM, TrainingArguments

from goat_hf import GoatConfig, get_goat_model, load_goat_adapter, save_goat_adapter, write_model_card
from goat_hf.adapter_io import CONFIG_NAME, WEIGHTS_NAME, GoatAdapterError
from goat_hf.hub import GoatHubError, load_goat_model, push_goat_adapter
from goat_hf.model_card import CARD_NAME, HEATMAP_NAME

TOKEN = "hf_goatTestTokenThatMustNeverBeWritten"
ADAPTER = {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME}
CONFIG = GoatConfig(r=4, num_experts=2, top_k=1)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub on 127.0.0.1 for one test; huggingface_hub pointed at it, online, with its cache in tmp_path.

    HF_ENDPOINT is read when huggingface_hub is imported (conftest imports it first), so the constants it was
    turned into are patched instead: ENDPOINT (HfApi made at call time, as goat_hf does) and the resolve URL
    template (downloads). conftest's HF_HUB_OFFLINE=1 is lifted for the test, and no stored login is read.
    """
    server = LocalHub(tmp_path / "hub-storage", token=TOKEN).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "login" / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def no_retry_wait(monkeypatch):
    """huggingface_hub retries dropped connections 5 times with 1-8 s waits; skip the waits, keep the retries."""
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny SVDs on two OpenMP threads crawl on a busy two-core machine (0.5 s each instead of 4 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama(seed=3).save_pretrained(folder)
    return folder


def goat_model(base_folder: Path, seed: int = 5) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(base_folder).eval()
    get_goat_model(model, CONFIG)
    perturb_(*(p for p in model.parameters() if p.requires_grad), seed=seed)  # a trained-like adapter
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**token_batch()).logits


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_token_nowhere(roots: list[Path], caplog, capsys, token: str = TOKEN, skip: tuple[Path, ...] = ()) -> None:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and path not in skip:
                assert token.encode() not in path.read_bytes(), f"the token was written into {path}"
    assert token not in caplog.text
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err


# ---- push -> load ----


def test_push_model_then_load_by_repo_id_is_exact(hub, base_folder, caplog):
    model = goat_model(base_folder)
    caplog.set_level(logging.INFO)
    info = push_goat_adapter(model, "goat-user/tiny-goat", token=TOKEN, commit_message="first adapter")

    assert info.oid == hub.repos["goat-user/tiny-goat"].branches["main"]
    assert hub.commit_messages == ["first adapter"]  # one commit holds the adapter and its card
    assert set(hub.files("goat-user/tiny-goat")) == ADAPTER
    routes = [path.rsplit("/", 2)[-2] if "/api/models/" in path else path for _, path in hub.requests]
    assert routes.index("/api/validate-yaml") < routes.index("preupload") < routes.index("commit")

    loaded = load_goat_model("goat-user/tiny-goat", base_model=base_folder, token=TOKEN).eval()
    assert torch.equal(logits(loaded), logits(model))
    card = ModelCard.load(next(Path(constants.HF_HUB_CACHE).glob("models--goat-user--tiny-goat/snapshots/*/README.md")))
    assert "Expert loads are not known for this card" in card.text


def test_load_goat_adapter_takes_a_hub_id(hub, base_folder):
    model = goat_model(base_folder)
    push_goat_adapter(model, "goat-user/by-id", token=TOKEN)
    fresh = LlamaForCausalLM.from_pretrained(base_folder).eval()
    assert torch.equal(logits(load_goat_adapter(fresh, "goat-user/by-id", token=TOKEN)), logits(model))


def test_pushed_card_has_the_metadata_and_the_heatmap(hub, base_folder, tmp_path):
    model = goat_model(base_folder)
    folder = save_goat_adapter(model, tmp_path / "adapter")
    names = list(n for n, _ in model.named_modules() if n.endswith(("q_proj", "down_proj")))
    trained = SimpleNamespace(routing_loads={name: [0.7, 0.3] for name in names}, args=None, state=None)
    write_model_card(
        model,
        folder,
        trained,
        dataset_name="glue",
        metrics={"eval_accuracy": 0.875},
        license="apache-2.0",
        base_model="goat-user/tiny-llama-base",
    )
    push_goat_adapter(folder, "goat-user/carded", token=TOKEN)

    files = hub.files("goat-user/carded")
    assert set(files) == ADAPTER | {HEATMAP_NAME}
    card_path = tmp_path / "downloaded.md"
    card_path.write_bytes(files[CARD_NAME])
    card = ModelCard.load(card_path)
    data = card.data.to_dict()
    assert data["base_model"] == "goat-user/tiny-llama-base"
    assert data["library_name"] == "goat_hf"
    assert {"goat", "lora", "moe", "mixture-of-experts", "text-generation"} <= set(data["tags"])
    assert data["datasets"] == ["glue"]
    assert data["metrics"] == ["accuracy"]
    assert data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-generation"
    result = data["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.875}
    assert result["dataset"]["name"] == "glue"
    assert f"]({HEATMAP_NAME})" in card.text
    image = Image.open(folder / HEATMAP_NAME)
    assert image.format == "PNG" and image.width > 2 * 28 and image.height > len(names) * 10
    assert files[HEATMAP_NAME] == (folder / HEATMAP_NAME).read_bytes()


def test_push_folder_without_card_writes_one_from_the_config(hub, base_folder, tmp_path):
    folder = save_goat_adapter(goat_model(base_folder), tmp_path / "bare")
    push_goat_adapter(folder, "goat-user/bare", token=TOKEN)
    card = (folder / CARD_NAME).read_text()
    assert f"written from {CONFIG_NAME}, which does not record them" in card
    assert hub.files("goat-user/bare")[CARD_NAME] == card.encode()


def test_an_existing_card_is_pushed_as_it_is(hub, base_folder, tmp_path):
    folder = save_goat_adapter(goat_model(base_folder), tmp_path / "edited")
    (folder / CARD_NAME).write_text("---\nlicense: mit\n---\n# My own words\n")
    push_goat_adapter(folder, "goat-user/edited", token=TOKEN)
    assert hub.files("goat-user/edited")[CARD_NAME] == b"---\nlicense: mit\n---\n# My own words\n"


# ---- revisions ----


def test_branches_pull_requests_and_revision_pinning(hub, base_folder):
    first, second, branch = (goat_model(base_folder, seed=s) for s in (1, 2, 3))
    pinned = push_goat_adapter(first, "goat-user/versions", token=TOKEN).oid
    push_goat_adapter(second, "goat-user/versions", token=TOKEN)
    push_goat_adapter(branch, "goat-user/versions", token=TOKEN, revision="exp/r4")  # created from main
    pull = push_goat_adapter(first, "goat-user/versions", token=TOKEN, create_pr=True, commit_message="Proposal")
    assert pull.pr_url is not None and pull.pr_revision == "refs/pr/1"

    def load(revision):
        return load_goat_model("goat-user/versions", base_folder, revision=revision, token=TOKEN).eval()

    assert torch.equal(logits(load(pinned)), logits(first))
    assert torch.equal(logits(load(None)), logits(second))  # the pull request did not touch main
    assert torch.equal(logits(load("exp/r4")), logits(branch))


def test_private_repo_with_the_token_from_env_or_login(hub, base_folder, tmp_path, monkeypatch):
    model = goat_model(base_folder)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_goat_adapter(model, "secret", private=True)  # no namespace: the token's user
    assert hub.repos["goat-user/secret"].private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(GoatHubError, match="no such repo, or it is private"):
        load_goat_model("goat-user/secret", base_folder)
    login = Path(constants.HF_TOKEN_PATH)
    login.parent.mkdir(parents=True)
    login.write_text(TOKEN)  # what `hf auth login` leaves
    assert torch.equal(logits(load_goat_model("goat-user/secret", base_folder).eval()), logits(model))


# ---- offline ----


def test_load_from_the_cache_offline_after_a_first_download(hub, base_folder, monkeypatch):
    model = goat_model(base_folder)
    push_goat_adapter(model, "goat-user/cached", token=TOKEN)
    load_goat_model("goat-user/cached", base_folder, token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    loaded = load_goat_model("goat-user/cached", base_folder).eval()
    assert torch.equal(logits(loaded), logits(model))
    assert len(hub.requests) == seen  # nothing asked of the Hub
    with pytest.raises(
        GoatHubError, match="is no local folder, nor in the local Hub cache, and the Hub cannot be reached"
    ):
        load_goat_model("goat-user/never-downloaded", base_folder)


# ---- failures ----


def test_a_rejected_token_fails_clearly_and_leaves_the_folder(hub, base_folder, tmp_path, caplog, capsys):
    folder = save_goat_adapter(goat_model(base_folder), tmp_path / "adapter")
    write_model_card(goat_model(base_folder), folder)
    before = digests(folder)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(GoatHubError, match=r"the Hub rejected the token \(HTTP 401\).*HF_TOKEN") as error:
        push_goat_adapter(folder, "goat-user/denied", token="hf_wrongToken123")
    assert "hf_wrongToken123" not in str(error.value)
    assert digests(folder) == before
    assert "goat-user/denied" not in hub.repos
    assert_token_nowhere([tmp_path], caplog, capsys, token="hf_wrongToken123")


@pytest.mark.parametrize("revision", [None, "no-such-branch"], ids=["unknown-repo", "unknown-revision"])
def test_loading_what_the_hub_does_not_have_fails_clearly(hub, base_folder, revision):
    if revision is None:
        with pytest.raises(
            GoatHubError,
            match="'goat-user/nothing' is no local folder; downloading it .* failed: the Hub has no such repo",
        ):
            load_goat_model("goat-user/nothing", base_folder, token=TOKEN)
        return
    push_goat_adapter(goat_model(base_folder), "goat-user/one-branch", token=TOKEN)
    with pytest.raises(GoatHubError, match="'no-such-branch' failed: the repo has no such revision"):
        load_goat_model("goat-user/one-branch", base_folder, revision=revision, token=TOKEN)


def test_a_path_that_is_neither_folder_nor_repo_id(hub, base_folder, tmp_path):
    with pytest.raises(
        GoatAdapterError, match="is not a GOAT adapter folder: goat_config.json is missing, as there is no such folder"
    ):
        load_goat_model(str(tmp_path / "missing" / "adapter"), base_folder)


def test_hub_going_down_mid_upload_fails_clearly_and_leaves_the_folder(hub, base_folder, tmp_path, no_retry_wait):
    folder = save_goat_adapter(goat_model(base_folder), tmp_path / "adapter")
    write_model_card(goat_model(base_folder), folder)
    before = digests(folder)
    hub.fail_from("commit")
    with pytest.raises(GoatHubError, match="could not be reached or dropped the connection") as error:
        push_goat_adapter(folder, "goat-user/interrupted", token=TOKEN)
    assert "The adapter files here are unchanged; run the push again" in str(error.value)
    assert digests(folder) == before
    assert hub.commit_messages == []
    assert sum(route.endswith("/commit/main") for _, route in hub.requests) > 1  # retried, then gave up


def test_a_folder_that_is_no_adapter_is_refused_before_any_request(hub, tmp_path):
    with pytest.raises(GoatAdapterError, match="is not a GOAT adapter folder"):
        push_goat_adapter(tmp_path, "goat-user/empty", token=TOKEN)
    assert hub.requests == []


# ---- GoatTrainer ----


def hub_trainer(base_folder: Path, output_dir: Path, repo_id: str, **settings):
    """A GoatTrainer that pushes to `repo_id` with the test token: 2 steps on 8 rows, a checkpoint at step 2."""
    from goat_hf import GoatTrainer

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (8,), generator=generator).tolist() for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_steps=2, report_to=[], disable_tqdm=True, use_cpu=True,
        push_to_hub=True, hub_model_id=repo_id, hub_token=TOKEN, **settings,
    )  # fmt: skip
    dataset = [{"input_ids": ids, "labels": ids} for ids in rows]
    model = LlamaForCausalLM.from_pretrained(base_folder)
    return GoatTrainer(model, args=args, train_dataset=dataset, goat_config=CONFIG), args


def test_trainer_pushes_adapter_card_and_checkpoint_never_base_weights(hub, base_folder, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    trainer, args = hub_trainer(base_folder, tmp_path / "run", "goat-user/trained", hub_strategy="checkpoint")
    assert args.hub_token == TOKEN  # the caller's arguments are untouched
    trainer.train()
    info = trainer.push_to_hub(license="apache-2.0")

    files = hub.files("goat-user/trained")
    assert info.oid == hub.repos["goat-user/trained"].branches["main"]
    assert set(files) >= ADAPTER | {HEATMAP_NAME, "last-checkpoint/" + WEIGHTS_NAME, "last-checkpoint/optimizer.pt"}
    assert {name for name in files if "/" not in name} == ADAPTER | {HEATMAP_NAME}
    assert not any(name.endswith(("model.safetensors", "pytorch_model.bin")) for name in files)
    assert hub.commit_messages[-1] == "End of training"
    assert "Training in progress, step 2" in hub.commit_messages
    card = ModelCard(files[CARD_NAME].decode())
    assert card.data.library_name == "goat_hf" and card.data.license == "apache-2.0"
    assert "| model.layers.0.self_attn.q_proj |" in card.text  # the routing loads the trainer logged
    assert_token_nowhere([tmp_path], caplog, capsys)


def test_trainer_push_failures_are_logged_then_raised(hub, base_folder, tmp_path, caplog, no_retry_wait):
    trainer, _ = hub_trainer(base_folder, tmp_path / "run", "goat-user/offline-run")
    hub.fail_from("preupload")
    trainer.train()  # the checkpoint push fails in the background; training goes on
    with pytest.raises(GoatHubError, match="'goat-user/offline-run' failed: the Hub could not be reached"):
        trainer.push_to_hub()
    assert "A checkpoint push failed; training goes on" in caplog.text
    assert trainer.state.global_step == 2 and (tmp_path / "run" / WEIGHTS_NAME).is_file()


def test_push_needs_the_adapter_weights(hub, base_folder, tmp_path):
    folder = save_goat_adapter(goat_model(base_folder), tmp_path / "adapter")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(GoatAdapterError, match="goat_adapter.safetensors is missing; save the adapter again"):
        push_goat_adapter(folder, "goat-user/weightless", token=TOKEN)
    assert hub.requests == []


def test_a_local_base_is_recorded_without_its_path_and_must_be_named(base_folder, tmp_path):
    model = goat_model(base_folder)  # loaded from a folder: config.name_or_path is that folder's absolute path
    folder = save_goat_adapter(model, tmp_path / "adapter")
    text = (folder / CONFIG_NAME).read_text()
    assert str(base_folder) not in text and base_folder.name not in text  # nothing of the trainer's disk layout
    assert json.loads(text)["base_model"]["name_or_path"] is None
    with pytest.raises(GoatAdapterError, match=r"trained on a local LlamaForCausalLM and records no Hub id for its "):
        load_goat_model(folder)
    assert torch.equal(logits(load_goat_model(folder, base_folder).eval()), logits(model))


def test_an_old_record_of_a_local_base_that_is_gone_must_be_named(base_folder, tmp_path):
    folder = save_goat_adapter(goat_model(base_folder), tmp_path / "adapter")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["base_model"]["name_or_path"] = str(tmp_path / "deleted-base")  # what earlier goat_hf versions recorded
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(
        GoatAdapterError, match=r"records the local folder .*deleted-base, which is not here; pass base_"
    ):
        load_goat_model(folder)


def test_the_base_hub_id_is_recorded_and_loaded_from_the_hub(hub, base_folder, tmp_path):
    HfApi(endpoint=hub.url).create_repo("goat-user/tiny-base", token=TOKEN)
    HfApi(endpoint=hub.url).upload_folder(folder_path=base_folder, repo_id="goat-user/tiny-base", token=TOKEN)
    model = goat_model(base_folder)
    model.config.name_or_path = "goat-user/tiny-base"  # a local copy named by its Hub id, as transformers does
    folder = save_goat_adapter(model, tmp_path / "adapter")
    assert json.loads((folder / CONFIG_NAME).read_text())["base_model"]["name_or_path"] == "goat-user/tiny-base"
    loaded = load_goat_model(folder, token=TOKEN).eval()  # no base named: the recorded id is downloaded
    assert torch.equal(logits(loaded), logits(model))
    assert any("/goat-user/tiny-base/resolve/" in path for _, path in hub.requests)
