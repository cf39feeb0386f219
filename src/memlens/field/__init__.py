"""The competing methods of the field, as small pure building blocks.

Each module reimplements one published method from its paper and its released code, with the conventions of that
code kept (and named where they are surprising), so `memlens bench` can run them side by side with BE on the same
generations:

- `detectors`: Asthana & Belagiannis' anisotropy score and Jeon, Kim & No's SAIL sharpness score, per image;
- `curvature`: Kim & Lee's Hutchinson diagonal, curvature-difference and score-difference maps;
- `thresholds`: IoU at Otsu, at a fixed 0.5, and at mem-curv-diff's oracle threshold (numpy only);
- `webster`: Webster / mem-curv-diff ground truth (template masks, per-prompt types) from local files (no torch);
- `guidance`: Jain et al.'s CFG delay and opposite guidance as guidance-scale schedules, Kim & No's end-token mask.

Nothing here runs a pipeline: the functions take a denoiser callable, predictions, maps or files, so they work for
any UNet or transformer wrapper. `docs/field.md` gives each formula, its conventions, its cost and its source.
"""

__all__ = ["detectors", "curvature", "thresholds", "webster", "guidance"]
