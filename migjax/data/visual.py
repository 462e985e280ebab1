"""Image tasks for RL: the embedded scene task and the real visual datasets as `Example`s with
one image each, resized to the run's fixed size, and their encoding (the image placeholder
tokens written into the prompt, the image-token layout beside the token arrays).

The prompt text is the question with Qwen2.5-VL's placeholder in front:
`<|vision_start|>` + M x `<|image_pad|>` + `<|vision_end|>`, M = the image's tokens after the
2x2 merge; the template and chat template then wrap it as any question.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from migjax.data.sources import Example, LoadStats
from migjax.models.multimodal import IMAGE_TOKENS, ImageLayout, image_layout

log = logging.getLogger(__name__)

VISUAL_KINDS = ("scenes", "clevr", "super_clevr", "counting_jsonl")


def is_visual(kind: str) -> bool:
    return kind in VISUAL_KINDS


def placeholder(n_tokens: int) -> str:
    """The prompt text that stands for one image of `n_tokens` tokens."""
    start, pad, end = IMAGE_TOKENS
    return start + pad * n_tokens + end


def resize(image, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3] of a PIL image, array or path (bicubic, as transformers'
    image processor resamples)."""
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as im:
            im = im.convert("RGB")
            im.load()
    elif isinstance(image, np.ndarray):
        im = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    else:
        im = image.convert("RGB")
    if im.size != (width, height):
        im = im.resize((width, height), Image.BICUBIC)
    return np.asarray(im, np.uint8)


def scene_spec(c, variant: str):
    """The preset CoGenT split `variant` (train / test: condition A; ood: condition B with more
    objects) rendered at the run's image size, with `task.scenes.*` object counts."""
    from migjax.data import scenes

    s = c.task.scenes
    lo, hi = (s.ood_objects if variant == "ood" else s.objects)
    return dataclasses.replace(scenes.scene_spec(variant), width=c.task.image.width,
                               height=c.task.image.height, min_objects=lo, max_objects=hi)


def scene_examples(c, variant: str, n: int) -> tuple[list[Example], np.ndarray]:
    """(examples with their worked solutions, uint8 images [n, H, W, 3]) of a scene split."""
    from migjax.data import scenes

    task = scenes.SceneTask(scene_spec(c, variant), n)
    items = [task[i] for i in range(n)]
    return ([Example(id=it.id, question=it.question, answers=(it.answer,), solution=it.solution)
             for it in items], np.stack([it.image for it in items]))


def parse_spec(kind_path: str) -> tuple[str, str, str]:
    """(kind, path, extra) of a visual data spec "kind:path[#extra]": the CLEVR split
    ("clevr:ROOT#valB") or Super-CLEVR's image folder ("super_clevr:questions.json#images/")."""
    kind, _, rest = kind_path.partition(":")
    path, _, extra = rest.partition("#")
    if kind in ("clevr", "super_clevr") and not extra:
        what = "split (clevr:ROOT#valA)" if kind == "clevr" else \
            "image folder (super_clevr:QUESTIONS.json#IMAGE_DIR)"
        raise ValueError(f"data spec {kind_path!r}: {kind} needs its {what}")
    return kind, path, extra


def dataset_examples(c, kind_path: str, *, limit: int | None
                     ) -> tuple[list[Example], np.ndarray, LoadStats]:
    """(examples, uint8 images, load stats) of a real visual dataset "kind:path[#extra]"; a
    record with more than one image is skipped and counted (one image per prompt)."""
    from migjax.data.visual_sources import load_visual_examples

    kind, path, extra = parse_spec(kind_path)
    kw = {"clevr": {"split": extra}, "super_clevr": {"image_dir": extra}}.get(kind, {})
    records, stats = load_visual_examples(kind, path, strict=c.task.strict, limit=limit, **kw)
    h, w = c.task.image.height, c.task.image.width
    examples, images = [], []
    for r in records:
        if len(r.images) != 1:
            stats.skipped += 1
            stats.reasons["several_images"] = stats.reasons.get("several_images", 0) + 1
            continue
        examples.append(Example(id=r.id, question=r.question, answers=r.answers))
        images.append(resize(r.images[0], h, w))
    if not images:
        return [], np.zeros((0, h, w, 3), np.uint8), stats
    return examples, np.stack(images), stats


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """The images of an encoded example set, row for row, and their prompts' image layout."""

    images_ExHxWxC: np.ndarray  # uint8
    layout: ImageLayout

    def take(self, idx) -> tuple[np.ndarray, ImageLayout]:
        return self.images_ExHxWxC[idx], self.layout.take(idx)


def attach_images(encoded, examples: list[Example], images: np.ndarray, *, image_token_id: int,
                  grid_thw, spatial_merge_size: int):
    """`encoded` (examples encoded with `placeholder` prompts) with its `ImageSet`: each kept row
    takes the image of its example (by id)."""
    row_of = {ex.id: i for i, ex in enumerate(examples)}
    if len(row_of) != len(examples):
        raise ValueError("visual examples: ids are not unique; the images cannot be matched")
    kept = images[[row_of[i] for i in encoded.ids]] if len(encoded) else images[:0]
    layout = image_layout(encoded.tokens_ExP, encoded.mask_ExP, image_token_id=image_token_id,
                          grid_thw=grid_thw, images_per_prompt=1,
                          spatial_merge_size=spatial_merge_size)
    return dataclasses.replace(encoded, images=ImageSet(kept, layout))
