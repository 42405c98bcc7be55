"""`edgetune build`: the whole pipeline from one TOML file, incremental and resumable.

Stages: materialize -> finetune -> merge -> export (per target) -> validate (per target)
-> bundle (per target). Each stage writes its folder under ``<output>/.work/`` atomically
(``artifacts.stage_output``) and the build keeps, per stage, a small state file with the
stage's fingerprint (content hashes of its inputs + its options + its code identity) and the signature of the
output it made. A stage whose fingerprint and output are unchanged is skipped; an
interrupted build re-runs only the stages that did not finish (fine-tuning also resumes
from its last checkpoint).

Bundles land in ``<output>/<target>/`` (+ ``<target>.tar.gz``) only when validation
passed. A bundle that misses a budget is still written, to ``<output>/rejected/<target>/``,
so it can be inspected and run, but never where a deploy script picks bundles up; the
build then exits 1 after printing the summary.
"""

from __future__ import annotations

# the config's schema and checks (`edgetune.build.load_config` is the documented entry), the pipeline, its summary
from .config import BuildConfig, TargetCfg, ValidateCfg, load_config, unknown_keys
from .pipeline import build
from .summary import summary_text

__all__ = ["BuildConfig", "TargetCfg", "ValidateCfg", "load_config", "unknown_keys", "build", "summary_text"]
