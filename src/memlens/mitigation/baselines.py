"""Randomisation baselines (Somepalli et al. 2023b; Wen et al. 2024's comparisons), each a pure function of a seed.

- RT  (random token insertion):   insert `count` tokens decoded from random non-special vocabulary ids.
- RNA (random number insertion):  insert `count` random integers below 100000.
- CWR (caption word repetition):  insert `count` copies of randomly chosen words of the prompt.
- GNI (Gaussian noise injection): e + lambda * N(0, I) on the conditional text embedding.

Text edits insert at a random word boundary (start and end included), one insertion at a time, as the reference
does. They are applied to every prompt: these baselines have no detector, so every image counts as triggered.
GNI perturbs only the conditional embedding, every token position; the reference also perturbed the unconditional
embedding, which moves the CFG reference point as well and so mixes two effects.
"""

from __future__ import annotations

import random

import torch

__all__ = ["random_token_insertion", "random_number_insertion", "caption_word_repetition", "gaussian_noise",
           "augment_prompt", "TEXT_BASELINES", "DEFAULT_REPEAT"]

DEFAULT_REPEAT = 4  # Wen's README: 4 insertions at inference
NUMBER_BOUND = 100000


def _insert(prompt: str, word: str, rng: random.Random) -> str:
    words = prompt.split()
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def random_token_insertion(prompt: str, tokenizer, seed: int, count: int = DEFAULT_REPEAT) -> str:
    """RT: `count` random vocabulary tokens (specials excluded), decoded to text and inserted."""
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    out = prompt
    for _ in range(count):
        for _attempt in range(100):
            tid = rng.randrange(vocab)
            word = tokenizer.decode([tid]).strip() if tid not in special else ""
            if word:
                break
        else:
            word = "x"
        out = _insert(out, word, rng)
    return out


def random_number_insertion(prompt: str, seed: int, count: int = DEFAULT_REPEAT) -> str:
    """RNA: `count` random integers in [0, 100000) inserted."""
    rng = random.Random(seed)
    out = prompt
    for _ in range(count):
        out = _insert(out, str(rng.randrange(NUMBER_BOUND)), rng)
    return out


def caption_word_repetition(prompt: str, seed: int, count: int = DEFAULT_REPEAT) -> str:
    """CWR: `count` copies of random words of the original prompt inserted."""
    rng = random.Random(seed)
    words = prompt.split()
    out = prompt
    for _ in range(count):
        if not words:
            break
        out = _insert(out, rng.choice(words), rng)
    return out


TEXT_BASELINES = ("rt", "rna", "cwr")


def augment_prompt(method: str, prompt: str, seed: int, tokenizer=None, count: int = DEFAULT_REPEAT) -> str:
    if method == "rt":
        return random_token_insertion(prompt, tokenizer, seed, count)
    if method == "rna":
        return random_number_insertion(prompt, seed, count)
    if method == "cwr":
        return caption_word_repetition(prompt, seed, count)
    raise ValueError(f"unknown text baseline {method!r}; expected one of {TEXT_BASELINES}")


def gaussian_noise(embeds: torch.Tensor, lam: float, seeds) -> torch.Tensor:
    """GNI: each row i of `embeds` (n, L, D) plus lam * N(0, I) drawn from a CPU generator seeded with seeds[i]."""
    noise = torch.stack([
        torch.randn(embeds.shape[1:], generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ])
    return (embeds.float() + lam * noise.to(embeds.device)).to(embeds.dtype)
