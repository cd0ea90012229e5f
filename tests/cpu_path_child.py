"""Run in a child process by tests/test_cpu_paths.py, under the environment a test sets (ATEN_CPU_CAPABILITY,
MARCO_NATIVE): SmolLM2's greedy answers to a few chat prompts and the logits of one prompt, printed as JSON, so the
parent can compare every kernel path on one machine with the same references."""

from __future__ import annotations

import json
import sys

import torch

from marco_local.generate import generate
from marco_local.kernels import native
from marco_local.layers.kv_cache import make_cache
from marco_local.load.gguf import load_gguf

# each prompt with the word every right answer contains (a 135M model phrases its answers differently on kernels
# that round differently, so the test asks for the answer, and for logits near the exact model's)
PROMPTS = {
    "What is the capital of France? Answer with the city name.": "Paris",
    "How many legs does a spider have? Answer with a number.": "8",
    "What is the capital of Japan? Answer with the city name.": "Tokyo",
    "What is 2 + 2? Answer with a number.": "4",
}
TOKENS = 24


def main(path: str) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_gguf(path, dtype=torch.bfloat16)
    answers = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        answers.append(generate(model, tokenizer, text, max_tokens=TOKENS))
    first = next(iter(PROMPTS))
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": first}]))])
    with torch.inference_mode():
        logits = model(ids, make_cache(model, ids.shape[1] + 1))[0].float()
    out = {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native": native.available(),
        "answers": answers,
        "logits": logits.tolist(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
