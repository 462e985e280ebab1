"""Host-side input pipeline: examples encoded once into padded token arrays, then a deterministic,
checkpointable, per-process-sharded grain iterator of `PromptBatch`es."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from migjax.data.sources import Example
from migjax.types import PromptBatch

log = logging.getLogger(__name__)

OVERLONG_MODES = ("skip", "truncate")
_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class EncodedExamples:
    """E encoded examples: left-padded prompts, right-padded answer variants, host-side text.

    A grain data source: `len()` and `[i]` give a record of numpy arrays and the index `i`,
    which becomes `PromptBatch.example_id_B` and indexes `ids`, `questions` and `answers`.
    """

    tokens_ExP: np.ndarray  # int32, left-padded prompt tokens
    mask_ExP: np.ndarray  # bool, True on real prompt tokens
    answer_ExVxA: np.ndarray  # int32, reference answer variants, right-padded
    answer_mask_ExVxA: np.ndarray  # bool; a variant with no token is absent
    ids: list[str]  # Example.id per row
    questions: list[str]
    answers: list[tuple[str, ...]]  # the answer variants kept, in order
    images: Any = None  # data.visual.ImageSet of an image task, row for row (None: text)

    def __post_init__(self):
        e, p = self.tokens_ExP.shape
        shapes = {
            "mask_ExP": (self.mask_ExP.shape, (e, p)),
            "answer_mask_ExVxA": (self.answer_mask_ExVxA.shape, self.answer_ExVxA.shape),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise ValueError(f"EncodedExamples: {name} has shape {got}, expected {want}")
        if self.answer_ExVxA.ndim != 3 or self.answer_ExVxA.shape[0] != e:
            raise ValueError(
                f"EncodedExamples: answer_ExVxA has shape {self.answer_ExVxA.shape}, expected "
                f"({e}, V, A)"
            )
        for name in ("ids", "questions", "answers"):
            if len(getattr(self, name)) != e:
                raise ValueError(
                    f"EncodedExamples: {name} has {len(getattr(self, name))} entries, expected {e}"
                )

    def __len__(self) -> int:
        return self.tokens_ExP.shape[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"EncodedExamples: index {index} out of range for {len(self)}")
        return {
            "tokens_P": self.tokens_ExP[i],
            "mask_P": self.mask_ExP[i],
            "answer_VxA": self.answer_ExVxA[i],
            "answer_mask_VxA": self.answer_mask_ExVxA[i],
            "example_id": np.int32(i),
        }

    @functools.cached_property
    def digest(self) -> str:
        """A content hash of the token arrays and ids, the same in every process and run."""
        h = hashlib.sha256()
        for a in (self.tokens_ExP, self.mask_ExP, self.answer_ExVxA, self.answer_mask_ExVxA):
            h.update(repr((a.dtype.str, a.shape)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        h.update("\0".join(self.ids).encode("utf-8", "surrogatepass"))
        if self.images is not None:
            h.update(np.ascontiguousarray(self.images.images_ExHxWxC).tobytes())
        return h.hexdigest()[:16]

    def image_of(self, index: int) -> dict[str, np.ndarray]:
        """{"image": the uint8 image of row `index`} for an image task, else {}."""
        return {} if self.images is None else {"image": self.images.images_ExHxWxC[index]}

    def trimmed(self, multiple: int = 8) -> EncodedExamples:
        """The same examples without the leading pad columns that no prompt uses (the width is
        rounded up to `multiple`): sampling and scoring cost grow with the prompt width."""
        p = self.tokens_ExP.shape[1]
        longest = int(self.mask_ExP.sum(axis=1).max(initial=0))
        width = min(p, max(multiple, -(-longest // multiple) * multiple))
        if width == p:
            return self
        images = self.images
        if images is not None:
            images = dataclasses.replace(images, layout=images.layout.trimmed(p - width))
        return dataclasses.replace(self, tokens_ExP=self.tokens_ExP[:, p - width:],
                                   mask_ExP=self.mask_ExP[:, p - width:], images=images)

    def __repr__(self) -> str:  # stable across runs: grain restores in-memory sources by repr
        e, v, a = self.answer_ExVxA.shape
        return f"EncodedExamples(E={e}, P={self.tokens_ExP.shape[1]}, V={v}, A={a}, {self.digest})"


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError(
            f"encode_examples: tokenizer {type(tokenizer).__name__} has no pad token; set "
            "pad_token (load_tokenizer falls back to eos)"
        )
    return int(pad)


def _token_lists(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_examples(
    examples: Sequence[Example],
    tokenizer,
    *,
    render: Callable[[str], str],
    max_prompt_len: int,
    max_answer_len: int,
    max_variants: int,
    overlong: str = "skip",
) -> tuple[EncodedExamples, dict[str, int]]:
    """Tokenizes `render(question)` and each answer variant (no special tokens added) into arrays.

    Prompts are left-padded to `max_prompt_len` with the pad id; a longer prompt is skipped
    (`overlong="skip"`) or cut from the left, keeping its end (`"truncate"`). Answer variants
    (the text between <answer> and </answer>) are right-padded to `max_answer_len`; empty ones
    and longer ones are dropped, then the first `max_variants` kept. An example with a blank
    question or no usable variant is skipped. Returns the encoded examples and counts:
    encoded, skipped_long_prompt, skipped_long_answer, skipped_empty, truncated_prompt,
    dropped_long_variant, dropped_extra_variant.
    """
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"encode_examples: overlong must be one of {OVERLONG_MODES}, "
                         f"got {overlong!r}")
    for name, v in (("max_prompt_len", max_prompt_len), ("max_answer_len", max_answer_len),
                    ("max_variants", max_variants)):
        if v < 1:
            raise ValueError(f"encode_examples: {name} must be >= 1, got {v}")
    pad = _pad_id(tokenizer)
    stats = dict.fromkeys(
        ("encoded", "skipped_long_prompt", "skipped_long_answer", "skipped_empty",
         "truncated_prompt", "dropped_long_variant", "dropped_extra_variant"), 0)
    skipped_ids: dict[str, list[str]] = {}

    prompts = _token_lists(tokenizer, [render(ex.question) for ex in examples])
    flat = [a for ex in examples for a in ex.answers]
    flat_tokens = iter(_token_lists(tokenizer, flat))

    kept: list[tuple[Example, list[int], list[tuple[str, list[int]]]]] = []
    for ex, prompt in zip(examples, prompts, strict=True):
        variants = [(a, next(flat_tokens)) for a in ex.answers]
        usable = [(a, t) for a, t in variants if t and len(t) <= max_answer_len]
        n_long = sum(len(t) > max_answer_len for _, t in variants)
        reason = None
        if not ex.question.strip() or (not usable and n_long == 0):
            reason = "skipped_empty"
        elif not usable:
            reason = "skipped_long_answer"
        elif len(prompt) > max_prompt_len:
            if overlong == "skip":
                reason = "skipped_long_prompt"
            else:
                stats["truncated_prompt"] += 1
                prompt = prompt[-max_prompt_len:]
        if reason is not None:
            stats[reason] += 1
            skipped_ids.setdefault(reason, []).append(ex.id)
            continue
        stats["dropped_long_variant"] += n_long
        stats["dropped_extra_variant"] += max(0, len(usable) - max_variants)
        kept.append((ex, prompt, usable[:max_variants]))

    e = len(kept)
    tokens_ExP = np.full((e, max_prompt_len), pad, np.int32)
    mask_ExP = np.zeros((e, max_prompt_len), bool)
    answer_ExVxA = np.full((e, max_variants, max_answer_len), pad, np.int32)
    answer_mask_ExVxA = np.zeros((e, max_variants, max_answer_len), bool)
    for i, (_, prompt, usable) in enumerate(kept):
        tokens_ExP[i, max_prompt_len - len(prompt):] = prompt
        mask_ExP[i, max_prompt_len - len(prompt):] = True
        for v, (_, toks) in enumerate(usable):
            answer_ExVxA[i, v, : len(toks)] = toks
            answer_mask_ExVxA[i, v, : len(toks)] = True
    stats["encoded"] = e

    bad = {k: v for k, v in stats.items() if k != "encoded" and v}
    if bad:
        examples_of = "; ".join(f"{k}: e.g. {ids[:3]}" for k, ids in skipped_ids.items())
        log.warning("encode_examples: encoded %d of %d examples; %s%s", e, len(examples), bad,
                    f" ({examples_of})" if examples_of else "")
    encoded = EncodedExamples(
        tokens_ExP=tokens_ExP, mask_ExP=mask_ExP, answer_ExVxA=answer_ExVxA,
        answer_mask_ExVxA=answer_mask_ExVxA, ids=[ex.id for ex, _, _ in kept],
        questions=[ex.question for ex, _, _ in kept],
        answers=[tuple(a for a, _ in usable) for _, _, usable in kept],
    )
    return encoded, stats


def arith_examples(task, n: int, offset: int = 0) -> list[Example]:
    """Items offset..offset+n-1 of an `ArithTask` as `Example`s with the single answer."""
    if n < 0 or offset < 0:
        raise ValueError(f"arith_examples: n and offset must be >= 0, got n={n}, offset={offset}")
    if offset + n > len(task):
        raise ValueError(f"arith_examples: items {offset}..{offset + n - 1} exceed the task "
                         f"size {len(task)}")
    items = (task[i] for i in range(offset, offset + n))
    return [Example(id=it.id, question=it.question, answers=(it.answer,)) for it in items]


def _to_prompt_batch(batch: dict[str, np.ndarray]) -> PromptBatch:
    return PromptBatch(
        tokens_BxP=np.asarray(batch["tokens_P"], np.int32),
        mask_BxP=np.asarray(batch["mask_P"], bool),
        answer_BxVxA=np.asarray(batch["answer_VxA"], np.int32),
        answer_mask_BxVxA=np.asarray(batch["answer_mask_VxA"], bool),
        example_id_B=np.asarray(batch["example_id"], np.int32),
    )


def _jsonable(x: Any) -> Any:
    """`x` with numpy scalars and tuples turned into plain JSON types."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _shuffle_seed(seed: int) -> int:
    """A 32-bit shuffle seed mixed from `seed`: grain reshuffles epoch k with seed + k, so
    unmixed run seeds 0 and 1 would share orders one epoch apart."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


class PromptIterator:
    """Endless (or `num_epochs`) iterator of `PromptBatch`es of numpy arrays over one shard.

    Every shard has the same length (the last `len(encoded) % shard_count` examples are left
    out), so all processes produce the same number of batches and share one iterator state.
    """

    def __init__(self, encoded: EncodedExamples, *, batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None, shard_index: int = 0,
                 shard_count: int = 1, prefetch: int = 4):
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"make_iterator: need 0 <= shard_index < shard_count, got "
                             f"shard_index={shard_index}, shard_count={shard_count}")
        if batch_size < 1:
            raise ValueError(f"make_iterator: batch_size must be >= 1, got {batch_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"make_iterator: num_epochs must be >= 1 or None, got {num_epochs}")
        shard_len = len(encoded) // shard_count
        if shard_len < batch_size:
            raise ValueError(
                f"make_iterator: {len(encoded)} examples over {shard_count} shard(s) leave "
                f"{shard_len} per shard, fewer than batch_size={batch_size}"
            )
        self.encoded = encoded
        self.batches_per_epoch = shard_len // batch_size
        self.config = {
            "data": repr(encoded), "batch_size": batch_size, "seed": seed,
            "shuffle": shuffle, "shard_count": shard_count,
        }
        self.shard_index, self.num_epochs = shard_index, num_epochs
        ds = grain.MapDataset.source(encoded)
        ds = ds[: shard_len * shard_count][shard_index::shard_count]
        if shuffle:
            ds = ds.shuffle(seed=_shuffle_seed(seed))
        ds = ds.batch(batch_size, drop_remainder=True).map(_to_prompt_batch)
        ds = ds.repeat(num_epochs)  # each epoch is shuffled and batched on its own
        read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
        self._it = ds.to_iter_dataset(read).__iter__()

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> PromptBatch:
        return next(self._it)

    def close(self) -> None:
        """Stops the read-ahead thread."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def get_state(self) -> dict[str, Any]:
        """JSON-able position: the next batch after `set_state` is the next batch now."""
        return {"version": _STATE_VERSION, "config": dict(self.config),
                "grain": _jsonable(self._it.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from `get_state()` of an iterator over the same data and batching (any
        shard index, any num_epochs); raises ValueError naming what differs otherwise."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"PromptIterator.set_state: not a version-{_STATE_VERSION} "
                             f"iterator state: {str(state)[:200]}")
        saved = state.get("config", {})
        diff = {k: (saved.get(k), v) for k, v in self.config.items() if saved.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"PromptIterator.set_state: state is from another pipeline ({shown})")
        self._it.set_state(state["grain"])


def make_iterator(encoded: EncodedExamples, *, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                  prefetch: int = 4) -> PromptIterator:
    """A `PromptIterator` over shard `shard_index` of `shard_count` (one per process) giving
    `batch_size` prompts per batch; `num_epochs=None` repeats forever, every epoch reshuffled
    from `seed`, the remainder of each epoch dropped. `prefetch` batches are read ahead."""
    return PromptIterator(encoded, batch_size=batch_size, seed=seed, shuffle=shuffle,
                          num_epochs=num_epochs, shard_index=shard_index,
                          shard_count=shard_count, prefetch=prefetch)

