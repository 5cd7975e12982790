"""Mistral (sliding window), Gemma 2, Gemma 3 (text) and Phi-3 (LongRoPE, fused checkpoints) against HF transformers
on tiny random models in float32, with prompts longer than the sliding window; start-time errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from model_harness import RaggedRunner, assert_greedy_matches_hf, greedy, tp_worker
from test_models import _free_port, ours
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config

from radixserve.model_files import load_hf_config
from worker_proc.attention.base import LayerAttention
from worker_proc.models import MODELS, build_model, model_class
from worker_proc.weights import load_model

WINDOW = 6
STEPS = 15
# head_dim 64: a size FlashInfer's prebuilt kernels cover (the GPU test)
_COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
               vocab_size=251, max_position_embeddings=128, rms_norm_eps=1e-6)
KINDS = ("mistral", "gemma2", "gemma3", "phi3")


def tiny_config(kind: str):
    if kind == "mistral":
        return MistralConfig(**_COMMON, num_hidden_layers=2, sliding_window=WINDOW, tie_word_embeddings=False)
    if kind == "gemma2":  # sliding / full alternating, both soft caps
        return Gemma2Config(**_COMMON, num_hidden_layers=3, sliding_window=WINDOW,
                            query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if kind == "gemma3":  # two sliding layers then a full one; local base, linear-scaled global RoPE
        return Gemma3TextConfig(**_COMMON, num_hidden_layers=3, sliding_window=WINDOW,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                query_pre_attn_scalar=24, rope_theta=1e6, rope_local_base_freq=100.0,
                                rope_scaling={"rope_type": "linear", "factor": 8.0})
    # LongRoPE: the prompts stay below original_max_position_embeddings (the short factors); factor 2 scales cos/sin
    gen = torch.Generator().manual_seed(5)
    phi3 = {**_COMMON, "hidden_size": 256}  # HF checks the factors against hidden_size / heads, not head_dim
    return Phi3Config(**phi3, num_hidden_layers=2, sliding_window=WINDOW * 2, original_max_position_embeddings=64,
                      rope_scaling={"type": "longrope", "short_factor": (1 + torch.rand(32, generator=gen)).tolist(),
                                    "long_factor": (1 + 4 * torch.rand(32, generator=gen)).tolist()},
                      tie_word_embeddings=False, pad_token_id=0)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """kind -> (saved HF directory, the HF model in eager attention), every parameter randomised."""
    out = {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(10 + i)
        hf = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager").eval()
        norm_base = 0.0 if kind.startswith("gemma") else 1.0  # Gemma scales by (1 + weight)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                p.copy_((norm_base if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        path = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(path)
        out[kind] = (str(path), hf)
    return out


def prompts() -> list[list[int]]:
    """Longer than the window (20), about as long (7), inside it (3)."""
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 251, (n,), generator=gen).tolist() for n in (20, 7, 3)]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_hf(family_models, kind):
    model_dir, hf = family_models[kind]
    assert_greedy_matches_hf(ours(model_dir), hf, prompts(), STEPS)


def test_layer_kinds(family_models):
    """What each architecture asks of attention, per layer: Gemma 2 alternates sliding and full layers."""
    gemma2 = ours(family_models["gemma2"][0])
    sliding, full = LayerAttention(24**-0.5, WINDOW, 2.0), LayerAttention(24**-0.5, None, 2.0)
    assert gemma2.attention_layers == (sliding, full, sliding)
    assert ours(family_models["mistral"][0]).attention_layers == (LayerAttention(64**-0.5, WINDOW),) * 2
    gemma3 = ours(family_models["gemma3"][0])
    assert [a.window for a in gemma3.attention_layers] == [WINDOW, WINDOW, None]


def test_chunked_prefill_across_the_window(family_models):
    """Gemma 2's long prompt in chunks of 4 (each chunk's queries see keys of earlier chunks, some out of the
    window) gives the one-shot logits."""
    model = ours(family_models["gemma2"][0])
    prompt = prompts()[0]
    whole, _ = greedy(model, [prompt], 0)
    runner = RaggedRunner(model, max_reqs=1)
    with torch.inference_mode():
        for start in range(0, len(prompt), 4):
            chunked = runner.step([0], [prompt[start:start + 4]])
    torch.testing.assert_close(chunked[0], whole[0, 0], atol=1e-5, rtol=0)


def test_tensor_parallel_matches_tp1(family_models, tmp_path):
    """2 ranks over gloo == 1 rank: Gemma 2 (sliding and global kinds, soft caps) and Phi-3 (fused checkpoint
    tensors split, then sharded)."""
    dirs = [family_models["gemma2"][0], family_models["phi3"][0]]
    batch, out = prompts(), tmp_path / "tp2.pt"
    mp.spawn(tp_worker, args=(2, f"tcp://127.0.0.1:{_free_port()}", dirs, batch, 4, str(out)), nprocs=2)
    tp2 = torch.load(out)
    for model_dir in dirs:
        logits, tokens = greedy(ours(model_dir), batch, 4)
        torch.testing.assert_close(tp2[model_dir]["logits"], logits, atol=1e-4, rtol=0)
        assert tp2[model_dir]["tokens"] == tokens


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported model.*GPT2LMHeadModel") as err:
        model_class(SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    assert all(name in str(err.value) for name in MODELS)
    assert model_class(SimpleNamespace(architectures=None, model_type="gemma3_text")).__name__ == "Gemma3ForCausalLM"


@pytest.mark.parametrize("change,message", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     "rope_type 'yarn'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unhonoured_config_fields_fail_at_build(change, message):
    """A field we would silently ignore (and serve wrong tokens) stops the build with its name."""
    config = MistralConfig(**{**_COMMON, "num_hidden_layers": 1, **change})
    with pytest.raises(NotImplementedError, match=message):
        build_model(config, torch.float32, "cpu")


def test_gemma_unhonoured_fields_fail_at_build():
    config = Gemma2Config(**_COMMON, num_hidden_layers=2, hidden_activation="relu")
    with pytest.raises(NotImplementedError, match="hidden_activation 'relu'"):
        build_model(config, torch.float32, "cpu")
    config = Gemma3TextConfig(**_COMMON, num_hidden_layers=2, use_bidirectional_attention=True)
    with pytest.raises(NotImplementedError, match="use_bidirectional_attention"):
        build_model(config, torch.float32, "cpu")


@pytest.mark.parametrize("name,arch,windows", [
    ("mistral-7b-v0.1", "MistralForCausalLM", [4096] * 32),
    ("gemma-2-9b", "Gemma2ForCausalLM", [4096, None] * 21),
    ("gemma-3-12b-text", "Gemma3ForCausalLM", ([1024] * 5 + [None]) * 8),
    ("phi-3-mini-128k", "Phi3ForCausalLM", [None] * 32),  # its 262144 window exceeds the 131072 positions
    ("llama-3.2-1b", "LlamaForCausalLM", [None] * 16),  # Llama-3.1-8B's draft model (STANDALONE) in benchmarks
])
def test_bundled_configs_build(name, arch, windows):
    """radixserve/model_configs' config of each family builds (on the meta device: no memory) with the layer kinds
    its published config implies, so `--load-format dummy` can run it."""
    from pathlib import Path

    config = load_hf_config(Path(__file__).resolve().parent.parent / "radixserve" / "model_configs" / name)
    model = build_model(config, torch.bfloat16, "meta")
    assert type(model).__name__ == arch
    assert [a.window for a in model.attention_layers] == windows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the FlashInfer backend)")
@pytest.mark.parametrize("kind", KINDS)
def test_flashinfer_bf16_close_to_hf(family_models, kind):
    """bf16 on the GPU through FlashInfer (a wrapper per layer kind: window_left, logits_soft_cap, sm_scale):
    teacher-forced logits within bf16 noise of HF's bf16 eager model, and the torch backend's greedy tokens
    on the same weights."""
    model_dir, _ = family_models[kind]
    model = load_model(model_dir, load_hf_config(model_dir), "safetensors", torch.bfloat16, "cuda")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="eager").cuda()
    batch = prompts()
    logits, tokens = greedy(model, batch, 4, backend="flashinfer")
    assert tokens == greedy(model, batch, 4, backend="torch")[1]
    for i, prompt in enumerate(batch):
        with torch.no_grad():
            want = hf(torch.tensor([prompt + tokens[i][:-1]], device="cuda")).logits[0, len(prompt) - 1:].float()
        torch.testing.assert_close(logits[:, i], want, atol=0.1, rtol=0)
