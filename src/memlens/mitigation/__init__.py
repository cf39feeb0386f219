"""Inference- and training-time mitigation of memorization, driven by the noise magnitude D or BE's masked LD.

Inference time (each attaches to a stock pipeline; no copied denoising loop):
- `prompt_embedding`: PE, prompt-embedding optimisation at the first step (`pe`, `pe-be`);
- `prss`: semantic search over paraphrases and prompt re-anchoring (`prss`, `prss-be`);
- `baselines`: RT, RNA, CWR (prompt edits) and GNI (embedding noise);
- `runner.mitigate_batch`: one batch through one method; `cli.mitigate_command` for files.
Training time: `training.filter_mask` drops samples whose D or LD exceeds a threshold.
"""

from memlens.mitigation.runner import METHODS, Job, Outcome, Settings, mitigate_batch

__all__ = ["METHODS", "Job", "Outcome", "Settings", "mitigate_batch"]
