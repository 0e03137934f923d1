#!/usr/bin/env python3
"""Expected token ids and rendered chat prompts for the Qwen3 tokenizer shipped in assets/.

    python3 tools/golden/make_text_golden.py   # needs `tokenizers` and `transformers` (no torch)

Writes fixtures/text/tokenize.json (ids from the Python `tokenizers` package, and their decode)
and fixtures/text/chat.json (transformers' apply_chat_template, tokenize=False).
"""
import json
import os

import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
ASSETS = os.path.join(ROOT, "assets", "qwen3-tokenizer")
OUT = os.path.join(ROOT, "fixtures", "text")

STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand   runs    of     spaces",
    "你好，世界！今天天气怎么样？",
    "混合 English 和中文 text 123",
    "emoji 😀🎉👍🏽 and 🇫🇷 flags, ZWJ 👨‍👩‍👧‍👦",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", 1 + 2); } // rust",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nreasoning\n</think>\n\nanswer<|endoftext|>",
    "numbers 3.14159 2718281828 1e-9 -0.5",
    "ÀÉÎÕÜ çñß Ωμέγα кириллица עברית العربية",
    "URL https://example.com/a?b=c&d=e#f and email a.b@c.de",
    "",
    " ",
    "\n",
    "a" * 50,
]

CONVERSATIONS = [
    ("single user turn", [{"role": "user", "content": "Hi there!"}]),
    ("system and user", [{"role": "system", "content": "You are a terse assistant."},
                         {"role": "user", "content": "Name three primes."}]),
    ("multi-turn", [{"role": "system", "content": "Be helpful."},
                    {"role": "user", "content": "What is Rust?"},
                    {"role": "assistant", "content": "A systems programming language."},
                    {"role": "user", "content": "Who made it?"}]),
    ("multi-turn with thinking in history", [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"}]),
    ("chinese", [{"role": "user", "content": "用一句话介绍你自己。"}]),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = tokenizers.Tokenizer.from_file(os.path.join(ASSETS, "tokenizer.json"))
    cases = []
    for s in STRINGS:
        ids = tok.encode(s, add_special_tokens=False).ids
        cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    with open(os.path.join(OUT, "tokenize.json"), "w") as f:
        json.dump({"tokenizers": tokenizers.__version__, "cases": cases}, f, ensure_ascii=False, indent=1)

    hf = AutoTokenizer.from_pretrained(ASSETS)
    chats = []
    for name, messages in CONVERSATIONS:
        for gen in (True, False):
            for thinking in (None, True, False):
                kwargs = {} if thinking is None else {"enable_thinking": thinking}
                text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)
                chats.append({"name": name, "messages": messages, "add_generation_prompt": gen,
                              "enable_thinking": thinking, "text": text})
    with open(os.path.join(OUT, "chat.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": chats}, f, ensure_ascii=False, indent=1)
    print(f"{len(cases)} tokenizer cases, {len(chats)} chat renderings")


if __name__ == "__main__":
    main()
