"""merge_jobs: merge hot LoRA adapters into the base weights as Ray jobs, verified before publication."""

from merge_jobs.merge import MERGE_METADATA, MergeRefused, MergeResult, merge_adapter

__all__ = ["MERGE_METADATA", "MergeRefused", "MergeResult", "merge_adapter"]
