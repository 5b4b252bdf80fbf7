#!/usr/bin/env python3
"""Reference greedy token ids for `kensa lm generate`, from Hugging Face transformers.

transformers loads the GGUF itself (through the `gguf` package): it dequantizes the weights,
undoes llama.cpp's q/k permutation, builds the tokenizer from the file's metadata and renders the
file's chat template. For each prompt (plain text, and the same as a one-turn chat) this writes the
prompt's token ids, the greedy continuation's ids and, per generated step, the margin between the
best and the second-best logit (so a difference from Kensa can be told apart from a near tie).

    source scripts/env.sh
    python tools/lm_reference.py --model $KENSA_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out crates/kensa-lm/tests/smollm2_reference.json

Needs `transformers gguf sentencepiece` in the venv (scripts/setup.sh --dev installs them).
"""

import argparse
import hashlib
import json
import os
import time
from importlib.metadata import version

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PLAIN = [
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):",
    "A scratch on a metal part is a defect because",
]
CHAT = [
    "What is the capital of France?",
    "Is a scratch on a screw a defect? Answer yes or no.",
    "Write a haiku about quality inspection.",
    "List three kinds of surface defects.",
]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    d, f = os.path.split(os.path.abspath(a.model))
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    load_s = time.time() - t0
    cases = []
    for chat, prompts in ((False, PLAIN), (True, CHAT)):
        for p in prompts:
            if chat:
                ids = tok.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            else:
                ids = tok(p)["input_ids"]
                text = p
            ids = list(ids)
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=a.max_new_tokens,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=tok.eos_token_id,
                )
            new = out.sequences[0, len(ids):].tolist()
            margins = []
            for s in out.scores:
                top = torch.topk(s[0].float(), 2).values
                margins.append(round(float(top[0] - top[1]), 5))
            cases.append(
                {
                    "chat": chat,
                    "prompt": p,
                    "rendered": text,
                    "prompt_ids": ids,
                    "output_ids": new,
                    "margins": margins,
                    "text": tok.decode(new, skip_special_tokens=False),
                }
            )
            print(json.dumps({"prompt": p, "chat": chat, "text": cases[-1]["text"]}))
    ref = {
        "model": f,
        "sha256": sha256(a.model),
        "generator": f"transformers {version('transformers')}, gguf {version('gguf')}, "
        f"torch {torch.__version__}, float32, greedy (do_sample=False)",
        "eos_token_id": tok.eos_token_id,
        "max_new_tokens": a.max_new_tokens,
        "load_s": round(load_s, 2),
        "cases": cases,
    }
    with open(a.out, "w") as fh:
        json.dump(ref, fh, indent=1)
        fh.write("\n")
    print(f"wrote {a.out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
