"""The reward stage: decode completions, segment their steps, verify their answers (host), then
score the step-conditioned answer likelihoods (jitted) and assemble the `TrainBatch`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from migjax.models import merge
from migjax.rewards import mig
from migjax.rewards.custom import CustomRewards
from migjax.rewards.segment import Segmentation, segment_completions
from migjax.rewards.verify import Verifier, outcome_rewards
from migjax.types import Rollout, TrainBatch


@dataclasses.dataclass(frozen=True)
class MigRules:
    """What the likelihood pass needs to know (hashable: a static jit argument)."""

    max_steps: int = 8
    delimiter: str = "step"
    variant_reduce: str = "max"
    count_closing_tokens: bool = False
    chunk: int = 256
    fast: bool = True


@functools.partial(jax.jit, static_argnames=("graphdef", "rules"))
def score_steps(graphdef, params, prompt_NxP, prompt_mask_NxP, tokens_NxC, mask_NxC, cuts_NxK1,
                probe_Q, answer_NxVxA, answer_mask_NxVxA, images=None, *, rules: MigRules):
    """l_NxK1 by the fast pass of `mig.step_likelihoods` (no gradient)."""
    return mig.step_likelihoods(
        merge(graphdef, params), prompt_NxP, prompt_mask_NxP, tokens_NxC, mask_NxC, cuts_NxK1,
        probe_Q, answer_NxVxA, answer_mask_NxVxA, variant_reduce=rules.variant_reduce,
        count_closing_tokens=rules.count_closing_tokens, chunk_size=rules.chunk, images=images)


@functools.partial(jax.jit, static_argnames=("graphdef", "rules"))
def score_steps_on_cache(graphdef, params, cache, prompt_NxP, prompt_mask_NxP, tokens_NxC,
                         mask_NxC, cuts_NxK1, probe_Q, answer_NxVxA, answer_mask_NxVxA, *,
                         rules: MigRules):
    """l_NxK1 by `mig.step_likelihoods_on_cache`: the probe blocks read the sampler's cache."""
    return mig.step_likelihoods_on_cache(
        merge(graphdef, params), cache, prompt_NxP, prompt_mask_NxP, tokens_NxC, mask_NxC,
        cuts_NxK1, probe_Q, answer_NxVxA, answer_mask_NxVxA, variant_reduce=rules.variant_reduce,
        count_closing_tokens=rules.count_closing_tokens, chunk_size=rules.chunk)


def scoring_shapes(cuts_NxK1: np.ndarray, num_steps_N: np.ndarray, width: int) -> tuple[int, int]:
    """(k1, columns) the step-likelihood pass needs for this batch: l_k for k > max K equals
    l_K (cut_k = cut_K), and no probe reads a completion token past the largest cut. Both are
    rounded up to a few buckets (k1 to 2^i + 1, columns to quarters of `width` in multiples of
    8), so a run compiles the pass for a handful of shapes."""
    k1_max = cuts_NxK1.shape[1]
    need = int(num_steps_N.max(initial=0)) + 1
    k1 = next(b for b in (2 ** i + 1 for i in range(32)) if b >= need)
    quarter = -(-max(-(-width // 4), 8) // 8) * 8
    cols = -(-max(int(cuts_NxK1.max(initial=0)), 1) // quarter) * quarter
    return min(k1, k1_max), min(cols, width)


class RewardStage:
    """Turns a rollout into a `TrainBatch`, plus the decoded texts for logging.

    `completion_prefix` is the text the prompt ends with and every completion continues
    (`task.completion_prefix`, e.g. "<think>\n"): verification, the format reward and step
    segmentation read it as the start of each completion, so a forced opening tag still counts.
    `custom` (`reward.custom`) adds the user's reward functions to the outcome reward.
    """

    def __init__(self, tokenizer, token_strings: list[str], *, probe: str, rules: MigRules,
                 verifier: Verifier, format_kw: dict | None = None,
                 completion_prefix: str = "", custom: CustomRewards | None = None):
        self.tokenizer = tokenizer
        self.token_strings = token_strings
        self.probe_Q = jnp.asarray(tokenizer.encode(probe, add_special_tokens=False), jnp.int32)
        if self.probe_Q.shape[0] == 0:
            raise ValueError(f"mig.probe={probe!r} encodes to no tokens")
        self.rules = rules
        self.verifier = verifier
        self.format_kw = {"delimiter": rules.delimiter, **(format_kw or {})}
        self.prefix = completion_prefix
        self.custom = custom

    def texts(self, tokens_NxC, mask_NxC) -> list[str]:
        """Each completion as text, the forced prefix included."""
        return [self.prefix + self.tokenizer.decode(t[m], skip_special_tokens=True)
                for t, m in zip(np.asarray(tokens_NxC), np.asarray(mask_NxC, bool), strict=True)]

    def custom_rewards(self, rollout: Rollout, texts, refs_N, preds, r_correct_N):
        """r_custom_N of the user's functions (None without any), TRL-style columns."""
        if self.custom is None:
            return None
        prompts = [self.tokenizer.decode(t[m], skip_special_tokens=True) for t, m in
                   zip(np.asarray(rollout.prompt_NxP), np.asarray(rollout.prompt_mask_NxP, bool),
                       strict=True)]
        return jnp.asarray(self.custom(
            prompts, texts, answer=[r[0] if r else "" for r in refs_N],
            references=[list(r) for r in refs_N], prediction=list(preds),
            correct=[float(x) for x in r_correct_N]))

    def segment(self, rollout: Rollout) -> Segmentation:
        return segment_completions(np.asarray(rollout.tokens_NxC), np.asarray(rollout.mask_NxC),
                                   self.token_strings, max_steps=self.rules.max_steps,
                                   delimiter=self.rules.delimiter, prefix=self.prefix)

    def __call__(self, graphdef, scorer_params, rollout: Rollout, answer_BxVxA,
                 answer_mask_BxVxA, refs_B: list[tuple[str, ...]], group_size: int, cache=None):
        """(TrainBatch, info) for the rollout of B prompts whose reference answers are
        `answer_BxVxA` (tokens) and `refs_B` (strings); info holds texts, predictions and the
        segmentation. `cache`: the sampler's KV cache of this rollout, made with
        `scorer_params` (`sample(..., return_cache=True)`); with it the step likelihoods read
        the completions' keys and values instead of computing them again (text prompts)."""
        seg = self.segment(rollout)
        texts = self.texts(rollout.tokens_NxC, rollout.mask_NxC)
        refs_N = [refs_B[i // group_size] for i in range(len(texts))]
        r_correct, r_format, preds = outcome_rewards(texts, refs_N, self.verifier,
                                                     **self.format_kw)
        rep = lambda x: jnp.repeat(jnp.asarray(x), group_size, axis=0)
        args = (rollout.prompt_NxP, rollout.prompt_mask_NxP, rollout.tokens_NxC,
                rollout.mask_NxC, jnp.asarray(seg.cuts_NxK1), self.probe_Q,
                rep(answer_BxVxA), rep(answer_mask_BxVxA))
        if self.rules.fast and cache is not None and rollout.images is None:
            # the probes read the sampler's cache: one shape per run (no recompiles)
            l_NxK1 = score_steps_on_cache(graphdef, scorer_params, cache, *args, rules=self.rules)
        elif self.rules.fast:  # on the columns and prefixes this batch needs (`scoring_shapes`)
            k1, cols = scoring_shapes(seg.cuts_NxK1, seg.num_steps_N, rollout.tokens_NxC.shape[1])
            l_NxK1 = score_steps(graphdef, scorer_params, args[0], args[1], args[2][:, :cols],
                                 args[3][:, :cols], args[4][:, :k1], *args[5:], rollout.images,
                                 rules=self.rules)
            l_NxK1 = jnp.pad(l_NxK1, ((0, 0), (0, seg.cuts_NxK1.shape[1] - k1)), mode="edge")
        else:
            l_NxK1 = mig.step_likelihoods_naive(
                merge(graphdef, scorer_params), *args, variant_reduce=self.rules.variant_reduce,
                count_closing_tokens=self.rules.count_closing_tokens, images=rollout.images)
        batch = TrainBatch(
            prompt_NxP=rollout.prompt_NxP, prompt_mask_NxP=rollout.prompt_mask_NxP,
            tokens_NxC=rollout.tokens_NxC, mask_NxC=rollout.mask_NxC,
            cot_mask_NxC=jnp.asarray(seg.cot_mask_NxC), step_id_NxC=jnp.asarray(seg.step_id_NxC),
            sampler_logp_NxC=rollout.sampler_logp_NxC, l_NxK1=l_NxK1,
            step_mask_NxK=jnp.asarray(seg.step_mask_NxK), num_steps_N=jnp.asarray(seg.num_steps_N),
            r_correct_N=jnp.asarray(r_correct), r_format_N=jnp.asarray(r_format),
            r_custom_N=self.custom_rewards(rollout, texts, refs_N, preds, r_correct),
            truncated_N=jnp.asarray(rollout.truncated_N), images=rollout.images)
        return batch, dict(texts=texts, preds=preds, seg=seg, refs=refs_N)
