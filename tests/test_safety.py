"""Safety of what a run reads and writes: weights only from safetensors (never unpickled), no
remote code, model text escaped in the HTML the trainer writes, and writes that a failure or a
kill cannot leave half done."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from migjax import checkpointing, trainer
from migjax.checkpointing import atomic_write_json
from migjax.metrics import MetricsWriter, read_metrics
from migjax.models import ModelConfig, init_model, load_pretrained, split
from migjax.models.loading import save_params
from migjax.viz import write_html

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = '<script>alert("x")</script><img src=x onerror="alert(1)">'
CFG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=8)


class Unpickled:
    """A pickle payload that leaves a marker file behind if anything ever unpickles it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_model_dir(path):
    shapes = jax.eval_shape(lambda: split(init_model(CFG, 0))[1])
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in shapes.items()}
    save_params(params, CFG, str(path))
    return params


# ---------------------------------------------------------------------------- weights


def test_pickle_weights_are_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Unpickled(str(marker)))
    model = tmp_path / "model"
    params = tiny_model_dir(model)
    # A pickle next to the safetensors file is ignored ...
    (model / "pytorch_model.bin").write_bytes(payload)
    _, cfg = load_pretrained(str(model))
    assert cfg.hidden_size == 16 and not marker.exists()
    # ... and a directory with only the pickle is refused, without opening it.
    os.remove(model / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"only pickle weights \(pytorch_model\.bin\)"):
        load_pretrained(str(model))
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(FileNotFoundError, match="never pickle files"):
        load_pretrained(str(model))
    assert not marker.exists()
    assert set(params) == {"attn_norm", "bk", "bq", "bv", "embed", "final_norm", "mlp_norm",
                           "w_down", "w_gate", "w_up", "wk", "wo", "wq", "wv"}


UNSAFE = {
    "torch.load": re.compile(r"\btorch\.load\s*\("),
    "pickle.load(s)": re.compile(r"\b(c?pickle|_pickle|dill|cloudpickle|joblib)\.loads?\s*\(", re.I),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
}


def python_files(*folders):
    for folder in folders:
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            yield from (os.path.join(root, f) for f in files if f.endswith(".py"))


def test_patterns_catch_what_they_look_for():
    samples = ["torch.load(f)", "pickle.loads(b)", "x = cPickle.load(fh)",
               "AutoModel.from_pretrained(p, trust_remote_code = True)",
               "np.load(f, allow_pickle=True)"]
    for sample in samples:
        assert any(p.search(sample) for p in UNSAFE.values()), sample
    assert not any(p.search("safe_open(path)  # never torch.loads anything")
                   for p in UNSAFE.values())


def test_package_source_never_unpickles_or_runs_remote_code():
    files = list(python_files("migjax", "scripts"))
    assert len(files) > 30  # the scan sees the package
    found = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                found += [f"{os.path.relpath(f, REPO)}:{lineno}: {name}"
                          for name, p in UNSAFE.items() if p.search(line)]
    assert not found, "unsafe loading in the package:\n" + "\n".join(found)


# ---------------------------------------------------------------------------- HTML


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    p = Tags()
    with open(path, encoding="utf-8") as f:
        p.feed(f.read())
    return p


def test_trainer_sample_pages_escape_model_output(tmp_path):
    """The per-step sample page the trainer writes from raw completions shows markup as text."""
    completion = f"<think>\nStep 1: {EVIL}\nStep 2: 3 + 4 = 7\n</think>\n<answer>{EVIL}</answer>"
    texts = [completion, EVIL]
    seg = SimpleNamespace(num_steps_N=np.asarray([2, 0], np.int32))
    info = {"texts": texts, "preds": [EVIL, ""], "refs": [[EVIL], ["7"]], "seg": seg}
    mask = np.ones((2, 4), bool)
    batch = SimpleNamespace(l_NxK1=np.asarray([[-3.0, -2.0, -1.0], [-3.0, -3.0, -3.0]],
                                              np.float32),
                            step_mask_NxK=np.asarray([[True, True], [False, False]]),
                            r_correct_N=np.asarray([1.0, 0.0], np.float32),
                            r_format_N=np.asarray([1.0, 0.0], np.float32),
                            num_steps_N=np.asarray([2, 0], np.int32), mask_NxC=mask,
                            cot_mask_NxC=mask & np.asarray([[1], [0]], bool),
                            step_id_NxC=np.asarray([[1, 1, 2, 0], [0, 0, 0, 0]], np.int32),
                            r_custom_N=None, truncated_N=None)
    from configs.base import get_config

    c = get_config()
    c.rl.group_size = 2
    trainer.log_samples(c, str(tmp_path), 7, info, batch, [EVIL])
    page = tmp_path / "samples" / "step_000007.html"
    raw = page.read_text(encoding="utf-8")
    assert "<script" not in raw.lower() and "<img" not in raw.lower()
    parsed = parse(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert "onerror" not in parsed.attrs and "src" not in parsed.attrs
    assert EVIL in "".join(parsed.text)  # shown, as text
    # the question (twice: one group), the step, the completions, the prediction, the reference
    assert raw.count("&lt;script&gt;") >= 7


# ---------------------------------------------------------------------------- atomic writes


def test_failed_serialisation_leaves_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"before": {"acc": 0.5}})
    for bad in ({"after": {"acc": float("inf")}}, {"after": [1, 2, object()]}):
        with pytest.raises(ValueError, match="summary.json"):
            atomic_write_json(path, bad)
        assert json.loads(path.read_text()) == {"before": {"acc": 0.5}}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_failure_mid_write_leaves_the_old_file(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "eval_samples.html"
    write_html(path, "<p>old</p>")

    def boom(*args, **kwargs):
        raise OSError(f"simulated failure in {fail_at}")

    if fail_at == "write":  # the disk fills after part of the page is written
        real_fdopen = os.fdopen

        def fdopen(fd, *a, **kw):
            f = real_fdopen(fd, *a, **kw)
            real_write = f.write

            class Half:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def write(self, text):
                    real_write(text[: len(text) // 2])
                    raise OSError("simulated failure in write")

                def __getattr__(self, name):
                    return getattr(f, name)

            return Half()

        monkeypatch.setattr(checkpointing.os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(checkpointing.os, fail_at, boom)
    with pytest.raises(OSError, match=f"simulated failure in {fail_at}"):
        write_html(path, "<p>new</p>" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "<p>old</p>"
    assert os.listdir(tmp_path) == ["eval_samples.html"]  # no temp file left


def test_metrics_resume_failure_keeps_every_line(tmp_path, monkeypatch):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 5):
            w.write(step, {"loss": float(step)})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    w = MetricsWriter(tmp_path, tensorboard=False)
    monkeypatch.setattr(checkpointing.os, "replace",
                        lambda *a: (_ for _ in ()).throw(OSError("simulated failure")))
    with pytest.raises(OSError, match="simulated failure"):
        w.resume(2)
    monkeypatch.undo()
    w.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


WRITER = textwrap.dedent("""
    import sys
    from migjax.checkpointing import atomic_write_text
    path = sys.argv[1]
    i = 0
    while True:
        atomic_write_text(path, f"version {i}\\n" * 20000)
        print(i, flush=True)
        i += 1
""")


def test_sigkill_during_atomic_writes_leaves_a_complete_version(tmp_path):
    """A process rewriting a file in a loop, killed at several moments: the file always holds
    one whole version (every line the same, all 20000 of them)."""
    path = tmp_path / "state.txt"
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.05, 0.4, size=3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO,
                                stdout=subprocess.PIPE, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert proc.stdout.readline()  # a first version is on disk
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lines = path.read_text().split("\n")
        assert lines[-1] == "" and len(lines) == 20001
        assert len(set(lines[:-1])) == 1 and lines[0].startswith("version ")


def test_trainer_sample_pages_use_the_runs_watermark_settings(tmp_path):
    """The credit shown per step is the g_k the update used: with `mig.watermark=False` a step
    that lowers the answer likelihood shows a negative gain instead of 0."""
    from configs.base import get_config

    completion = "<think>\nStep 1: 3 + 4 = 7\nStep 2: 7 + 1 = 8\n</think>\n<answer>8</answer>"
    seg = SimpleNamespace(num_steps_N=np.asarray([2], np.int32))
    info = {"texts": [completion], "preds": ["8"], "refs": [["8"]], "seg": seg}
    mask = np.ones((1, 4), bool)
    batch = SimpleNamespace(l_NxK1=np.asarray([[-3.0, -1.0, -2.0]], np.float32),
                            step_mask_NxK=np.asarray([[True, True]]),
                            r_correct_N=np.asarray([1.0], np.float32),
                            r_format_N=np.asarray([1.0], np.float32),
                            num_steps_N=np.asarray([2], np.int32), mask_NxC=mask,
                            cot_mask_NxC=mask, step_id_NxC=np.asarray([[1, 1, 2, 2]], np.int32),
                            r_custom_N=None, truncated_N=None)
    pages = {}
    for watermark in (True, False):
        c = get_config()
        c.mig.watermark = watermark
        c.rl.group_size = 1
        trainer.log_samples(c, str(tmp_path / str(watermark)), 3, info, batch, ["3 + 4 + 1?"])
        with open(tmp_path / str(watermark) / "samples" / "step_000003.html", encoding="utf-8") as f:
            pages[watermark] = f.read()
    assert "g=2.0000" in pages[True] and "g=0.0000" in pages[True]
    assert "g=2.0000" in pages[False] and "g=-1.0000" in pages[False]
