"""Inference- and training-time mitigation of memorization, driven by the noise magnitude D or BE's masked LD.

Inference time (each attaches to a stock pipeline; no copied denoising loop):
- `prompt_embedding`: PE, prompt-embedding optimisation at the first step (`pe`, `pe-be`);
- `prss`: semantic search over paraphrases and prompt re-anchoring (`prss`, `prss-be`);
- `baselines`: RT, RNA, CWR (prompt edits) and GNI (embedding noise);
- `runner.mitigate_batch`: one batch through one method; `runner.run_mitigation` for prompt files (`cli` is the
  `memlens mitigate` command).
Training time: `training.filter_mask` drops samples whose D or LD exceeds a threshold.
"""

__all__ = ["METHODS", "Job", "Outcome", "Settings", "mitigate_batch", "run_mitigation", "MitigationResult"]


def __getattr__(name: str):
    # runner imports torch; the `memlens mitigate` command module must load without it.
    if name in __all__:
        from memlens.mitigation import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'memlens.mitigation' has no attribute {name!r}")
