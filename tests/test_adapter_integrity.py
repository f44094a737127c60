"""Adapter folders are checked field by field and tensor by tensor; saves never leave a NaN, torn or private file."""

from __future__ import annotations

import errno
import json
import math
import os
import stat

import pytest
import torch
from conftest import perturb_, tiny_classifier, tiny_llama, token_batch, train_like_
from safetensors.torch import load_file, save_file

from goat_hf import GoatAdapterError, GoatConfig, get_goat_model, goat_layers, load_goat_adapter, save_goat_adapter
from goat_hf.adapter_format import SAVE_ID_KEY
from goat_hf.adapter_io import CONFIG_NAME, WEIGHTS_NAME, weights_digest
from goat_hf.fingerprint import _close, tensor_fingerprint

SMALL = GoatConfig(r=16, num_experts=8, top_k=2)
Q = "model.layers.0.self_attn.q_proj"


def trained(model, config: GoatConfig = SMALL):
    return train_like_(get_goat_model(model, config))


def logits(model, batch=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(batch or token_batch())).logits


@pytest.fixture
def saved(tmp_path):
    return save_goat_adapter(trained(tiny_llama(seed=0)), tmp_path / "adapter")


def edit_config(folder, edit) -> None:
    meta = json.loads((folder / CONFIG_NAME).read_text())
    edit(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def rewrite_weights(folder, edit) -> None:
    """Change the tensors and make the config vouch for the new file, as a hand-edited folder would."""
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt", SAVE_ID_KEY: meta["save_id"]})
    edit_config(folder, lambda m: m.update(weights_sha256=weights_digest((folder / WEIGHTS_NAME).read_bytes())))


def refused(folder, message: str, model=None) -> None:
    model = model or tiny_llama(seed=0)
    with pytest.raises(GoatAdapterError, match=message):
        load_goat_adapter(model, folder)
    assert not goat_layers(model) and not hasattr(model, "goat_state")  # a refused adapter leaves the model as it was


def _drop(*path):
    def edit(meta):
        for key in path[:-1]:
            meta = meta[key]
        del meta[path[-1]]

    return edit


def _set(value, *path):
    def edit(meta):
        for key in path[:-1]:
            meta = meta[key]
        meta[path[-1]] = value

    return edit


MALFORMED = {
    "no-layers": (_drop("layers"), r"is incomplete: field 'layers' is missing"),
    "no-config": (_drop("config"), r"is incomplete: field 'config' is missing"),
    "no-base-model": (_drop("base_model"), r"is incomplete: field 'base_model' is missing"),
    "version-string": (_set("1", "format_version"), r"field 'format_version' is '1', not an integer"),
    "version-null": (_set(None, "format_version"), r"field 'format_version' is None, not an integer"),
    "version-old": (_set(1, "format_version"), r"format version 1 .* Save the adapter again with this goat_hf"),
    "r-string": (_set("8", "config", "r"), r"field 'config' is invalid: r='8' must be an int, e\.g\. r=8"),
    "layers-list": (_set([], "layers"), r"field 'layers' is \[\] \(list\), expected an object"),
    "layers-empty": (_set({}, "layers"), r"names no GOAT layer \(field 'layers' is empty\)"),
    "config-field-missing": (_drop("config", "top_k"), r"field 'config' lacks \['top_k'\]; nothing is filled in"),
    "layer-field-missing": (_drop("layers", Q, "in_features"), rf"field \"layers\['{Q}'\]\.in_features\" is missing"),
    "scaling-string": (_set("1.0", "layers", Q, "scaling"), r"scaling\" is '1\.0' \(str\), expected a number"),
    "features-bool": (_set(True, "layers", Q, "in_features"), r"in_features\" is True \(bool\), expected an integer"),
    "residual-string": (_set("yes", "layers", Q, "residual"), r"residual\" is 'yes' \(str\), expected true or false"),
    "heads-string": (_set("lm_head", "modules_to_save"), r"'modules_to_save' is 'lm_head' \(str\), expected a list"),
    "architecture-int": (_set(3, "base_model", "architecture"), r"'base_model\.architecture' is 3 \(int\), expected"),
    "no-save-id": (_drop("save_id"), r"is incomplete: field 'save_id' is missing"),
    "no-base-tensors": (_drop("base_tensors"), r"is incomplete: field 'base_tensors' is missing"),
    "fingerprint-string": (_set("x", "base_tensors", "model.norm.weight", "fingerprint"), r"expected a list or null"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=MALFORMED)
def test_malformed_config_is_refused_naming_the_field(saved, case):
    edit, message = MALFORMED[case]
    edit_config(saved, edit)
    refused(saved, message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", r"goat_config\.json is corrupt \('utf-8' codec can't decode"),
        (b"", r"goat_config\.json is corrupt \(Expecting value"),
        (b'{"format_version": 2, "layers": {', r"goat_config\.json is corrupt \(Expecting"),
        (b"null", r"goat_config\.json is corrupt: it holds a JSON NoneType, not an object"),
    ],
    ids=["binary", "empty", "cut-short", "null"],
)
def test_unreadable_config_is_refused(saved, data, message):
    (saved / CONFIG_NAME).write_bytes(data)
    refused(saved, message + r".*[Ss]ave or download the adapter again")


def test_a_layer_missing_from_the_config_is_not_quietly_skipped(saved):
    edit_config(saved, _drop("layers", Q))
    refused(saved, rf"holds 5 tensor\(s\) its goat_config\.json does not account for \(e\.g\. \['{Q}\.expert_A'")


def test_tensors_the_config_does_not_name_are_refused(saved):
    rewrite_weights(saved, lambda t: t.update({"model.layers.9.mlp.up_proj.expert_A": torch.zeros(2, 2)}))
    refused(saved, r"holds 1 tensor\(s\) its goat_config\.json does not account for .*layers\.9\.mlp\.up_proj")


def test_a_missing_tensor_is_refused(saved):
    rewrite_weights(saved, lambda t: t.pop(f"{Q}.residual_B"))
    refused(saved, rf"does not match its goat_config\.json: '{Q}\.residual_B' is missing, expected \(64, 16\)")


def test_integer_tensors_are_refused(saved):
    rewrite_weights(saved, lambda t: t.update({f"{Q}.router.weight": torch.ones(8, 64, dtype=torch.int64)}))
    refused(saved, rf"tensor '{Q}\.router\.weight' is torch\.int64; adapter tensors are floating point")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_tensors_are_refused_on_loading(saved, value):
    def poison(tensors):
        tensors[f"{Q}.expert_B"][3, 5] = value

    rewrite_weights(saved, poison)
    refused(saved, rf"tensor '{Q}\.expert_B' has 1 NaN or infinite entries")


def test_weights_from_another_save_are_refused_as_incomplete(saved, tmp_path):
    model = trained(tiny_llama(seed=0))
    newer = save_goat_adapter(model, tmp_path / "newer")
    (saved / WEIGHTS_NAME).write_bytes((newer / WEIGHTS_NAME).read_bytes())  # new weights beside the old config
    refused(saved, r"is incomplete: goat_adapter\.safetensors comes from another save \(save id \w+\) than")


def test_a_flipped_byte_in_the_weights_is_refused(saved):
    data = bytearray((saved / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: still a readable safetensors file
    (saved / WEIGHTS_NAME).write_bytes(bytes(data))
    refused(saved, r"goat_adapter\.safetensors is corrupt: its SHA-256 differs from the one goat_config\.json records")


def _bump(name, index=0, delta=0.01):
    def edit(model):
        with torch.no_grad():
            model.get_parameter(name).view(-1)[index] += delta

    return edit


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.embed_tokens.weight", "embeddings"),
        ("model.norm.weight", "final norm"),
        ("model.layers.1.input_layernorm.weight", "layer norm"),
        ("lm_head.weight", "lm_head"),
        (f"{Q}.weight", "adapted W0"),
    ],
)
def test_any_base_tensor_the_output_depends_on_is_fingerprinted(saved, name, kind):
    base = tiny_llama(seed=0)
    _bump(name)(base)
    refused(saved, rf"^Base tensor '{name}' has other values than the base this adapter was trained on", base)


def test_bert_bias_and_embedding_norm_are_fingerprinted(tmp_path):
    folder = save_goat_adapter(trained(tiny_classifier("bert", seed=0)), tmp_path)
    for name in ("bert.embeddings.LayerNorm.bias", "bert.encoder.layer.1.output.dense.bias"):
        base = tiny_classifier("bert", seed=0)
        _bump(name)(base)
        refused(folder, rf"Base tensor '{name}' has other values", base)
    fresh = tiny_classifier("bert", seed=0)
    perturb_(fresh.classifier.weight, seed=5)  # the head comes from the adapter: its base values do not matter
    load_goat_adapter(fresh, folder)


def test_a_base_with_other_tensors_is_refused(saved):
    tied = tiny_llama(seed=0, tie_word_embeddings=True)
    with pytest.raises(GoatAdapterError, match=r"Base tensor '.*' .*(other values|missing here|is here but not)"):
        load_goat_adapter(tied, saved)


def test_saving_a_non_finite_adapter_is_refused_and_keeps_the_old_one(saved):
    model = load_goat_adapter(tiny_llama(seed=0), saved)
    expected = logits(model)
    with torch.no_grad():
        goat_layers(model)[Q].expert_A[0, 0] = float("nan")
    with pytest.raises(GoatAdapterError, match=rf"This adapter: tensor '{Q}\.expert_A' has 1 NaN or infinite entries"):
        save_goat_adapter(model, saved)
    assert torch.equal(logits(load_goat_adapter(tiny_llama(seed=0), saved)), expected)


def test_a_full_disk_says_so_and_keeps_the_old_adapter(saved, monkeypatch):
    expected = logits(load_goat_adapter(tiny_llama(seed=0), saved))
    model = trained(tiny_llama(seed=0))
    real_write = os.write

    def full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match=r"No space left on the device while writing .*goat_adapter\.safetensors") as err:
        save_goat_adapter(model, saved)
    assert err.value.errno == errno.ENOSPC and "still holds what it held before this save" in str(err.value)
    monkeypatch.undo()
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporary file left
    assert torch.equal(logits(load_goat_adapter(tiny_llama(seed=0), saved)), expected)


def test_each_file_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    folder = tmp_path / "adapter"
    save_goat_adapter(trained(tiny_llama(seed=0)), folder)
    replaced = [path for kind, path in events if kind == "replace"]
    assert [os.path.basename(p).split(".")[1:3] for p in replaced] == [
        ["goat_adapter", "safetensors"],
        ["goat_config", "json"],
    ]
    for path in replaced:
        assert events.index(("fsync", path)) < events.index(("replace", path))  # data on disk before the rename
        assert events[events.index(("replace", path)) + 1] == ("fsync", str(folder))  # then the folder entry


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        folder = save_goat_adapter(trained(tiny_llama(seed=0)), tmp_path / "adapter")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((folder / name).stat().st_mode) == expected, name


def test_the_next_save_removes_orphan_temporary_files(saved):
    orphans = [saved / f".{WEIGHTS_NAME}.0123abcd.tmp", saved / f".{CONFIG_NAME}.4567ef01.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half a file")
    (saved / "notes.tmp").write_text("not ours")
    save_goat_adapter(trained(tiny_llama(seed=0)), saved)
    assert not any(orphan.exists() for orphan in orphans)
    assert (saved / "notes.tmp").exists()


@pytest.mark.parametrize(
    "special", [float("-inf"), float("nan"), torch.finfo(torch.float32).min], ids=["-inf", "nan", "finfo.min"]
)
def test_mask_buffers_get_finite_fingerprints_that_still_see_a_change(special):
    mask = torch.zeros(16, 16).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), special)  # a causal mask
    fingerprint = tensor_fingerprint(mask)
    assert all(math.isfinite(value) for value in fingerprint)
    assert _close(tensor_fingerprint(mask.clone()), fingerprint, same_dtype=True)
    changed = mask.clone()
    changed[2, 5] = 0.0  # one masked position unmasked
    assert not _close(tensor_fingerprint(changed), fingerprint, same_dtype=True)
