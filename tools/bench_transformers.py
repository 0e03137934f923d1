#!/usr/bin/env python3
"""transformers on the same GPU and checkpoint as `qfuse bench`, for side-by-side figures.

    python3 tools/bench_transformers.py CHECKPOINT_DIR [--prompt-len 32 --new-tokens 256 --batch 1]

Loads the checkpoint in bf16 (eager attention, the default KV cache), times a batched prefill of
random prompts and greedy decoding with `generate` (EOS disabled), and prints one line in the
format of `qfuse bench`.
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--attn", default="eager")
    args = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation=args.attn)
    model = model.cuda().eval()
    model.generation_config.eos_token_id = None
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=gen).cuda()

    def run(new_tokens):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(4)  # warm-up
    prefill = run(1)
    total = run(args.new_tokens)
    decode = total - prefill
    steps = args.new_tokens - 1
    print(
        f"transformers ({args.attn}): batch {args.batch} prompt {args.prompt_len} new {args.new_tokens} | "
        f"prefill {1e3 * prefill:.1f} ms ({args.batch * args.prompt_len / prefill:.0f} tok/s) | "
        f"decode {1e3 * decode / steps:.3f} ms/step, {args.batch * steps / decode:.1f} tok/s"
    )


if __name__ == "__main__":
    main()
