"""The credit tool: l_k against an independent transformers computation on the same checkpoint,
the watermark fields, the step cap, and the errors for malformed input lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from migjax import credit
from migjax.data.tokenizer import build_arith_tokenizer

PROBE = "\n</think>\n<answer>"
RECORDS = [
    {"question": "3 + 4 * 2", "steps": ["Step 1: 4 * 2 = 8", "Step 2: 3 + 8 = 11"],
     "answer": "11"},
    {"question": "(5 - 2) * 6", "steps": ["5 - 2 = 3", "3 * 6 = 18", "so it is 18"],
     "answer": ["18", "18.0"]},
    {"question": "7 + 1", "steps": ["7 + 1 = 8"], "answer": "8"},
]
# The steps as the tool must score them: unnumbered steps get "Step k: " in front.
SCORED_STEPS = [
    ["Step 1: 4 * 2 = 8", "Step 2: 3 + 8 = 11"],
    ["Step 1: 5 - 2 = 3", "Step 2: 3 * 6 = 18", "Step 3: so it is 18"],
    ["Step 1: 7 + 1 = 8"],
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random float32 Qwen2 checkpoint with the arith tokenizer, as a transformers directory."""
    path = tmp_path_factory.mktemp("credit_model")
    tok = build_arith_tokenizer(str(path), vocab_size=256)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
        rms_norm_eps=1e-6, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: l_k must differ across k
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return str(path), model, tok


def reference_l(model, tok, question, steps, answers):
    """l_0..l_K: for each k, one transformers forward over prompt + prefix_k + probe + answer,
    the mean log-prob of the answer tokens, max over the answer variants."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    out = []
    for k in range(len(steps) + 1):
        prefix = "<think>" if k == 0 else "<think>\n" + "\n".join(steps[:k])
        best = -np.inf
        for a in answers:
            ctx, y = enc(question) + enc(prefix) + enc(PROBE), enc(a)
            ids = torch.tensor([ctx + y])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()
            lp = [logp[len(ctx) + t - 1, y[t]] for t in range(len(y))]
            best = max(best, float(np.mean(lp)))
        out.append(best)
    return np.array(out)


def watermark_reference(l, monotonic=True):
    h, g = [l[0]], []
    for k in range(1, len(l)):
        if monotonic:
            g.append(max(0.0, l[k] - h[-1]))
            h.append(max(h[-1], l[k]))
        else:
            g.append(l[k] - h[-1])
            h.append(l[k])
    return np.array(h), np.array(g)


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


@pytest.fixture(scope="module")
def cli_run(ckpt, tmp_path_factory):
    model_dir = ckpt[0]
    d = tmp_path_factory.mktemp("credit_run")
    data = write_jsonl(d / "in.jsonl", RECORDS)
    out, page = d / "out.jsonl", d / "credit.html"
    rc = credit.main(["--model", model_dir, "--data", data, "--out", str(out), "--html",
                      str(page), "--batch-size", "2"])
    assert rc == 0
    return [json.loads(x) for x in out.read_text().splitlines()], page.read_text()


def test_cli_l_matches_transformers(ckpt, cli_run):
    _, model, tok = ckpt
    rows, _ = cli_run
    assert [r["line"] for r in rows] == [1, 2, 3]
    for rec, steps, row in zip(RECORDS, SCORED_STEPS, rows, strict=True):
        answers = rec["answer"] if isinstance(rec["answer"], list) else [rec["answer"]]
        want = reference_l(model, tok, rec["question"], steps, answers)
        assert row["question"] == rec["question"]
        assert row["steps"] == steps
        assert row["num_steps"] == len(steps)
        np.testing.assert_allclose(row["l"], want, atol=2e-4, rtol=0)
    # The checkpoint is random but not flat: the likelihoods move from step to step.
    assert max(np.ptp(r["l"]) for r in rows) > 0.1


def test_cli_h_g_follow_the_watermark(cli_run):
    rows, _ = cli_run
    for row in rows:
        h, g = watermark_reference(row["l"])
        np.testing.assert_allclose(row["h"], h, atol=1e-6)
        np.testing.assert_allclose(row["g"], g, atol=1e-6)
        assert row["gain_sum"] == pytest.approx(sum(row["g"]), abs=1e-6)
        assert row["gain_sum"] == pytest.approx(max(row["l"]) - row["l"][0], abs=1e-5)
    assert any(r["gain_sum"] > 0 for r in rows)


def test_cli_html_page(cli_run):
    _, page = cli_run
    assert page.startswith("<!DOCTYPE html>")
    assert "3 + 4 * 2" in page and "Step 3: so it is 18" in page
    assert "18 | 18.0" in page


def test_no_watermark_naive_and_step_cap(ckpt, cli_run):
    model_dir = ckpt[0]
    rows, _ = cli_run
    plain = credit.compute_credit(model_dir, RECORDS, watermark=False, batch_size=2)
    for row, p in zip(rows, plain, strict=True):
        np.testing.assert_allclose(p["l"], row["l"], atol=1e-5)
        np.testing.assert_allclose(p["g"], np.diff(row["l"]), atol=1e-5)
        np.testing.assert_allclose(p["h"], row["l"], atol=1e-6)
    naive = credit.compute_credit(model_dir, RECORDS[1:2], naive=True)
    np.testing.assert_allclose(naive[0]["l"], rows[1]["l"], atol=1e-4)
    # K = 2: steps 2 and 3 of the second record merge, so l_2 is the old l_3.
    capped = credit.compute_credit(model_dir, RECORDS[1:2], max_steps=2)[0]
    assert capped["num_steps"] == 2
    assert capped["steps"] == [SCORED_STEPS[1][0], "\n".join(SCORED_STEPS[1][1:])]
    np.testing.assert_allclose(capped["l"], np.array(rows[1]["l"])[[0, 1, 3]], atol=1e-5)


GOOD = json.dumps(RECORDS[0])
BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "record is a JSON list, expected an object"),
    ('{"steps": ["Step 1: a"], "answer": "1"}', "field 'question' is missing"),
    ('{"question": "  ", "steps": ["Step 1: a"], "answer": "1"}', "field 'question' must be"),
    ('{"question": "q", "answer": "1"}', "field 'steps' is missing"),
    ('{"question": "q", "steps": [], "answer": "1"}', "field 'steps' must be a non-empty list"),
    ('{"question": "q", "steps": "Step 1: a", "answer": "1"}', "field 'steps' must be"),
    ('{"question": "q", "steps": ["Step 1: a", 2], "answer": "1"}', "field 'steps'[1]"),
    ('{"question": "q", "steps": ["Step 1: a"]}', "field 'answer' is missing"),
    ('{"question": "q", "steps": ["Step 1: a"], "answer": []}', "field 'answer' must be"),
    ('{"question": "q", "steps": ["Step 1: a"], "answer": ["1", 2]}', "field 'answer' must be"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_malformed_line_is_named(tmp_path, capsys, line, message):
    data = write_jsonl(tmp_path / "in.jsonl", [GOOD, "", line])
    out = tmp_path / "out.jsonl"
    rc = credit.main(["--model", str(tmp_path / "unused"), "--data", data, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{data}:3: " in err and message in err
    assert not out.exists()


def test_compute_credit_names_the_record(ckpt):
    with pytest.raises(credit.RecordError, match=r"record 1: field 'answer' is missing"):
        credit.compute_credit(ckpt[0], [RECORDS[0], {"question": "q", "steps": ["a"]}])


def test_skip_bad_counts_reports_and_skips(ckpt, tmp_path, capsys):
    # Line 4 parses but its first step holds a second "Step <n>:" line: it segments into 2 steps.
    two_in_one = {"question": "1 + 1", "steps": ["Step 1: a\nStep 2: b"], "answer": "2"}
    data = write_jsonl(tmp_path / "in.jsonl",
                       [GOOD, "{oops", BAD_LINES[5][0], json.dumps(two_in_one),
                        json.dumps(RECORDS[2])])
    out = tmp_path / "out.jsonl"
    args = ["--model", ckpt[0], "--data", data, "--out", str(out)]
    assert credit.main(args) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: not valid JSON" in err
    assert credit.main([*args, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 5]
    assert "skipped 3 malformed" in err
    assert f"{data}:2: not valid JSON" in err and f"{data}:3: field 'steps'" in err
    assert f"{data}:4: field 'steps': the completion segments into 2 step(s)" in err


def test_segmentation_mismatch_raises_without_skip(ckpt):
    rec = {"question": "1 + 1", "steps": ["Step 1: a\nStep 2: b"], "answer": "2"}
    with pytest.raises(credit.RecordError, match=r"record 0: field 'steps'.*2 step\(s\)"):
        credit.compute_credit(ckpt[0], [rec])


def test_defaults_are_the_configs():
    from configs.base import get_config

    c, d = get_config(), credit.CreditOptions()
    assert (d.probe, d.delimiter, d.variant_reduce, d.count_closing_tokens) == (
        c.mig.probe, c.mig.step_delimiter, c.mig.variant_reduce, c.mig.count_closing_tokens)
    assert (d.h0, d.watermark, d.likelihood_space) == (c.mig.h0, c.mig.watermark,
                                                      c.mig.likelihood_space)
    assert (d.template, d.use_chat_template, d.dtype, d.chunk) == (
        c.task.template, c.task.use_chat_template, c.model.dtype, c.rl.score_chunk)


def test_completion_text_format():
    assert credit.completion_text(["a", "Step 2: b"], "7") == (
        "<think>\nStep 1: a\nStep 2: b\n</think>\n<answer>7</answer>")
    assert credit.completion_text(["a", "b"], "7", "blank_line") == (
        "<think>\na\n\nb\n</think>\n<answer>7</answer>")
