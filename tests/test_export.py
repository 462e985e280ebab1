"""`python -m migjax.export WORKDIR [--step N] --out DIR`: a run's checkpoint as a Hugging Face
directory that transformers loads and decodes greedily exactly as migjax's sampler does; and a
finished run resumed with `checkpoint.export_hf=True` exports instead of doing nothing."""

from __future__ import annotations

import json

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from migjax import experiment as ex
from migjax import export, trainer
from migjax.models import split
from migjax.models.loading import load_pretrained
from migjax.rollout import SamplingRules, sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, sft_model, compile_cache):
    """A 3-step RL run from the warm-started tiny model, checkpoints at steps 2 and 3."""
    work = tmp_path_factory.mktemp("export") / "run"
    c = helpers.make_config("arith_tiny", helpers.shrink("arith_tiny", model_path=sft_model))
    with helpers.recording() as rec:
        trainer.train(c, str(work))
    return work, c, rec


def params_of(path):
    model, _ = load_pretrained(str(path))
    return {k: np.asarray(v) for k, v in split(model)[1].items()}


def test_export_writes_the_checkpointed_policy(run, tmp_path):
    work, _, rec = run
    assert export.main([str(work), "--out", str(tmp_path / "last")]) == 0
    assert export.main([str(work), "--step", "2", "--out", str(tmp_path / "two")]) == 0
    last, two = params_of(tmp_path / "last"), params_of(tmp_path / "two")
    assert set(last) == set(rec["params"])
    for k, v in rec["params"].items():  # the latest checkpoint is the final policy, bit for bit
        np.testing.assert_array_equal(last[k], v, err_msg=k)
    assert any(not np.array_equal(two[k], last[k]) for k in last)  # step 2 is another policy
    assert export.main([str(work), "--step", "1", "--out", str(tmp_path / "x")]) == 1
    assert export.main([str(tmp_path), "--out", str(tmp_path / "y")]) == 1  # not a run


def test_transformers_greedy_decoding_matches_the_sampler(run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    work, c, _ = run
    out = export.export(str(work), str(tmp_path / "hf"))
    tokenizer = ex.build_tokenizer(c, str(work))
    render = ex.renderer(c, tokenizer)
    prompts = [render(q) for q in ("Tom has 3 apples and buys 4 more. How many apples?",
                                   "A box holds 9 pens. 2 are taken. How many pens are left?")]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    model, _ = load_pretrained(out)
    graphdef, params = split(model)
    eos = tokenizer.eos_token_id
    rules = SamplingRules(max_new_tokens=24, greedy=True, stop_ids=(eos,),
                          pad_id=tokenizer.pad_token_id)
    for text in prompts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        r = sample(graphdef, params, jnp.asarray([ids], jnp.int32),
                   jnp.ones((1, len(ids)), bool), jax.random.key(0), rules=rules)
        ours = np.asarray(r.tokens_NxC[0])[np.asarray(r.mask_NxC[0], bool)].tolist()
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        theirs = gen[0, len(ids):].tolist()
        assert theirs == ours, (text, hf_tok.decode(theirs), tokenizer.decode(ours))
        assert len(ours) > 3  # something was generated
        assert hf_tok.decode(theirs) == tokenizer.decode(ours)


def test_resuming_a_finished_run_with_export_hf_exports(run, tmp_path):
    work, c, rec = run
    summary_path = work / "summary.json"
    assert "export" not in json.loads(summary_path.read_text())
    c = helpers.make_config("arith_tiny", dict(
        helpers.shrink("arith_tiny", model_path=c.model.path), **{"checkpoint.export_hf": True}))
    summary = trainer.train(c, str(work))
    assert summary["export"] == str(work / "export")
    assert json.loads(summary_path.read_text())["export"] == summary["export"]
    exported = params_of(summary["export"])
    for k, v in rec["params"].items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_export_of_a_run_from_its_own_warm_start(tmp_path, compile_cache):
    """The embedded default's shape: the run trains its warm start (WORKDIR/sft_model) and RL
    starts from it; the export rebuilds the model from that directory."""
    work = tmp_path / "run"
    c = helpers.make_config("arith_tiny", helpers.shrink("arith_tiny", rl__steps=2))
    assert trainer.uses_warmstart(c)
    with helpers.recording() as rec:
        trainer.train(c, str(work))
    assert (work / "sft_model").is_dir()
    out = export.export(str(work), str(tmp_path / "hf"))
    exported = params_of(out)
    for k, v in rec["params"].items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    arch = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings")
    got, want = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "hf",
                                                                      work / "sft_model"))
    assert {k: got[k] for k in arch} == {k: want[k] for k in arch}
