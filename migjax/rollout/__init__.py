"""Rollout: sampling rules and the jitted sampler."""

from migjax.rollout.sampler import SamplingRules, filter_logits, sample

__all__ = ["SamplingRules", "filter_logits", "sample"]
