#!/usr/bin/env python3
"""Build small random-weight Qwen3 checkpoints in HF format and record transformers' float64 outputs.

Run where torch + transformers are installed (the GPU machine has both; the CPU is used):

    python3 tools/golden/make_golden.py OUT_DIR

For each model OUT_DIR/<name>/ gets the checkpoint as `save_pretrained` writes it, plus
  golden.json         prompts, greedy continuations, versions and the float64 patches applied
  golden.safetensors  `case{i}.logits`: float64 [prompt_len + new_tokens - 1, vocab], teacher-forced
                      logits over prompt + greedy continuation (row r predicts token r + 1)

transformers in float64 is not pure float64: Qwen3RMSNorm computes in float32, the rotary cos/sin
tables are built in float32 and eager attention's softmax runs in float32. All three are patched
to float64 below (PATCHES lists them), and each patch is checked against a direct computation.
"""
import json
import math
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3 import modeling_qwen3 as mq

PATCHES = [
    "Qwen3RMSNorm.forward: statistic and scaling in the input dtype (float64), not float32",
    "Qwen3RotaryEmbedding.forward: inv_freq and cos/sin computed in float64",
    "eager_attention_forward: softmax in float64, not float32",
]


def rms_norm_f64(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def rope_theta_of(config):
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.rope_theta)


@torch.no_grad()
def rotary_f64(self, x, position_ids):
    cfg = self.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = rope_theta_of(cfg)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim))
    freqs = position_ids[:, :, None].to(torch.float64) * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def eager_attention_f64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = mq.repeat_kv(key, module.num_key_value_groups)
    value_states = mq.repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float64).to(query.dtype)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def apply_patches():
    mq.Qwen3RMSNorm.forward = rms_norm_f64
    mq.Qwen3RotaryEmbedding.forward = rotary_f64
    mq.eager_attention_forward = eager_attention_f64


def check_patches(model):
    """The patched modules must compute exactly what a direct float64 formula gives."""
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(3, norm.weight.shape[0], dtype=torch.float64) * 1e3
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    assert torch.allclose(norm(x), want, rtol=1e-14, atol=0), "RMSNorm patch not in effect"
    rot = model.model.rotary_emb
    pos = torch.tensor([[0, 1, 777]])
    cos, _ = rot(x, pos)
    dim = cos.shape[-1]
    theta = rope_theta_of(model.config)
    want_angle = 777 * theta ** (-2 * 1 / dim)
    assert cos.dtype == torch.float64 and abs(cos[0, 2, 1].item() - math.cos(want_angle)) < 1e-12, "RoPE patch"
    assert model.config._attn_implementation == "eager"


def randomize(model, spec, gen):
    """Weights with trained-like structure: O(1) activations, gains around 1, large k_norm gains."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                if "k_norm" in name:
                    lo, hi = spec["k_norm_gain"]
                elif "q_norm" in name:
                    lo, hi = 0.5, 2.0
                else:
                    lo, hi = 0.6, 1.6
                p.copy_(lo + (hi - lo) * torch.rand(p.shape, generator=gen, dtype=torch.float64))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
                # a few residual-stream outlier channels, as trained Qwen3 checkpoints have
                for c in spec.get("outlier_channels", []):
                    p[:, c] *= 40.0
            else:
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))


def rewrite_config_v4(path):
    """Turn a transformers-5 config.json into the 4.x dialect the published Qwen3 checkpoints use."""
    with open(path) as f:
        cfg = json.load(f)
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", cfg.get("rope_theta"))
    cfg["rope_scaling"] = None
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.51.0"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


@torch.no_grad()
def greedy(model, prompt, new_tokens):
    ids = list(prompt)
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):]


MODELS = [
    dict(name="tied-bf16-gqa2-v4", hidden=64, layers=2, heads=4, kv=2, head_dim=24, inter=160, vocab=256,
         tied=True, dtype=torch.bfloat16, dialect="v4", theta=1e6, k_norm_gain=(60.0, 120.0),
         outlier_channels=[5, 41], shard=None, prompts=[1, 9, 300], new_tokens=12),
    dict(name="untied-f32-mha-v5", hidden=48, layers=3, heads=4, kv=4, head_dim=12, inter=96, vocab=200,
         tied=False, dtype=torch.float32, dialect="v5", theta=10000.0, k_norm_gain=(0.5, 2.0),
         outlier_channels=[], shard=None, prompts=[2, 40], new_tokens=10),
    dict(name="mqa-sharded-bf16", hidden=64, layers=2, heads=8, kv=1, head_dim=16, inter=128, vocab=300,
         tied=False, dtype=torch.bfloat16, dialect="v5", theta=1e6, k_norm_gain=(80.0, 110.0),
         outlier_channels=[0], shard="60KB", prompts=[5, 120], new_tokens=10),
    dict(name="gqa4-f16", hidden=96, layers=2, heads=8, kv=2, head_dim=32, inter=192, vocab=160,
         tied=True, dtype=torch.float16, dialect="v5", theta=1e6, k_norm_gain=(1.0, 3.0),
         outlier_channels=[], shard=None, prompts=[3, 64], new_tokens=8),
]


def build(spec, out_root, seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"], head_dim=spec["head_dim"], max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=spec["tied"], rope_parameters={"rope_type": "default", "rope_theta": spec["theta"]},
        bos_token_id=None, eos_token_id=spec["vocab"] - 1, attention_bias=False, use_sliding_window=False,
    )
    model = Qwen3ForCausalLM(cfg).to(torch.float64)
    randomize(model, spec, gen)
    if spec["tied"]:
        model.tie_weights()
    out = os.path.join(out_root, spec["name"])
    shutil.rmtree(out, ignore_errors=True)
    kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    model.to(spec["dtype"]).save_pretrained(out, **kwargs)
    if spec["dialect"] == "v4":
        rewrite_config_v4(os.path.join(out, "config.json"))

    # The reference: the saved checkpoint loaded back, upcast exactly to float64.
    ref = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation="eager").eval()
    check_patches(ref)
    cases, tensors = [], {}
    for i, plen in enumerate(spec["prompts"]):
        prompt = torch.randint(0, spec["vocab"], (plen,), generator=gen).tolist()
        new_ids = greedy(ref, prompt, spec["new_tokens"])
        # The cached generation path must agree with the recompute-everything loop above.
        ref.generation_config.eos_token_id = None
        gen_out = ref.generate(torch.tensor([prompt]), max_new_tokens=spec["new_tokens"], do_sample=False,
                               pad_token_id=0)
        cached_ids = gen_out[0, plen:].tolist()
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + new_ids[:-1]])).logits[0]
        tensors[f"case{i}.logits"] = logits.contiguous()
        top2 = torch.topk(logits, 2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1])[plen - 1:]
        if cached_ids != new_ids:
            step = next(s for s, (a, b) in enumerate(zip(cached_ids, new_ids)) if a != b)
            print(f"  {spec['name']} case {i}: cached generate differs from recompute at step {step} "
                  f"(top-1 margin there {margins[step].item():.3e})")
        cases.append({"prompt_ids": prompt, "greedy_ids": new_ids, "hf_cached_generate_ids": cached_ids,
                      "min_top1_margin": float(margins.min())})
    save_file(tensors, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"model": spec["name"], "storage_dtype": str(spec["dtype"]).replace("torch.", ""),
                   "config_dialect": spec["dialect"], "torch": torch.__version__,
                   "transformers": transformers.__version__, "patches": PATCHES, "seed": seed,
                   "cases": cases}, f, indent=1)
    print(f"{spec['name']}: {len(cases)} cases, files {sorted(os.listdir(out))}")


def main():
    out_root = sys.argv[1] if len(sys.argv) > 1 else "fixtures/golden"
    os.makedirs(out_root, exist_ok=True)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    apply_patches()
    for seed, spec in enumerate(MODELS):
        build(spec, out_root, 1000 + seed)


if __name__ == "__main__":
    main()
