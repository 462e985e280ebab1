"""migjax beside Hugging Face transformers (PyTorch) and Tunix on this machine's CPU: the same
Qwen2-shape model with random weights, the same phases, tokens per second.

    python scripts/bench_peers.py --out bench_peers.json          # minutes per phase
    python scripts/bench_peers.py --quick --reps 2                # the plumbing, tiny sizes

Phases (float32; sizes: `SIZES`): rollout (sampling at temperature 1, no stop token), a grouped
rollout (G samples per prompt: migjax shares each prompt's prefill, transformers
`num_return_sequences` and Tunix, as its GRPO learner does, repeat the prompt), teacher-forced
scoring (per-token log-probs), a forward+backward+AdamW step on the next-token loss, and a GRPO
update (clipped-ratio loss on the completion log-probs, one AdamW step). What each framework
runs: migjax, the calls of scripts/bench.py and bench_mig.py (`migjax.update.make_update`);
transformers, the calls of ../shared/bench/hf_reference.py (`generate`, a forward with
log_softmax, a `labels=` loss), restated here because that script runs on CUDA only, and the
GRPO loss as TRL writes it; Tunix, its `Sampler`, `compute_per_token_logps`, the SFT trainer's
step with its default loss, and its `grpo_loss_fn`.

Each peer is installed once into its own virtual environment under --venvs (default
~/.cache/migjax-peers/<name>; `PEERS` lists the pins). Each framework's phase runs in its own
process, which compiles and warms up, then times one call each time it is asked; the calls go
round the frameworks in turn (migjax, transformers, Tunix, migjax, ...) so that a change in the
machine's load falls on all of them alike. The table gives median tokens/s; the JSON (--out)
every time. Worker logs: <out>.logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = {  # name: pip requirements of its virtual environment
    "transformers": ("torch==2.13.0", "transformers"),
    "tunix": ("google-tunix==0.1.7", "jax==0.10.2", "flax==0.12.8"),
}
FRAMEWORKS = ("migjax", "transformers", "tunix")
PHASES = ("rollout", "rollout_group", "score", "train", "grpo")
MODEL = dict(vocab=32000, hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2,
             head_dim=64)
SIZES = {
    "full": dict(model=MODEL,
                 rollout=dict(prompts=16, group=1, prompt_len=64, new_tokens=128),
                 rollout_group=dict(prompts=4, group=4, prompt_len=64, new_tokens=128),
                 score=dict(batch=8, seq_len=512), train=dict(batch=4, seq_len=512),
                 grpo=dict(prompts=4, group=4, prompt_len=64, completion_len=128)),
    "quick": dict(model=dict(vocab=512, hidden=64, intermediate=128, layers=2, heads=4,
                             kv_heads=2, head_dim=16),
                  rollout=dict(prompts=4, group=1, prompt_len=16, new_tokens=8),
                  rollout_group=dict(prompts=2, group=2, prompt_len=16, new_tokens=8),
                  score=dict(batch=2, seq_len=64), train=dict(batch=2, seq_len=64),
                  grpo=dict(prompts=2, group=2, prompt_len=16, completion_len=16)),
}
MARK = "@bench "  # prefix of the worker's protocol lines on its stdout
LOW = 100  # random tokens are drawn from [LOW, vocab - LOW): never the pad id 0


# ----------------------------------------------------------------------------- pure parts


def tokens_per_call(phase: str, s: dict) -> int:
    """Tokens one call of `phase` processes: new tokens for rollouts, all tokens otherwise."""
    if phase.startswith("rollout"):
        return s["prompts"] * s["group"] * s["new_tokens"]
    if phase == "grpo":
        return s["prompts"] * s["group"] * (s["prompt_len"] + s["completion_len"])
    return s["batch"] * s["seq_len"]


def label(phase: str, s: dict) -> str:
    return {
        "rollout": lambda: f"rollout {s['prompts']} x ({s['prompt_len']} + {s['new_tokens']})",
        "rollout_group": lambda: f"rollout {s['prompts']} x G{s['group']} x ({s['prompt_len']} "
                                 f"+ {s['new_tokens']})",
        "score": lambda: f"scoring {s['batch']} x {s['seq_len']}",
        "train": lambda: f"fwd+bwd+AdamW {s['batch']} x {s['seq_len']}",
        "grpo": lambda: f"GRPO update {s['prompts'] * s['group']} x ({s['prompt_len']} + "
                        f"{s['completion_len']})",
    }[phase]()


def interleaved(frameworks, reps: int) -> list[str]:
    """The order of the timed calls: each framework once per round, `reps` rounds."""
    return [fw for _ in range(reps) for fw in frameworks]


def summarise(phase: str, s: dict, seconds: dict[str, list[float]]) -> dict:
    """Median seconds and tokens/s per framework (None where it has no times)."""
    n = tokens_per_call(phase, s)
    med = {fw: statistics.median(t) if t else None for fw, t in seconds.items()}
    return dict(label=label(phase, s), tokens_per_call=n, seconds=seconds, median_s=med,
                tok_s={fw: n / m if m else None for fw, m in med.items()})


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def markdown_table(rows: list[dict], frameworks) -> str:
    """One row per phase: tokens/s of each framework, then migjax's over each peer's."""
    peers = [fw for fw in frameworks if fw != "migjax"]
    head = ["phase"] + [f"{fw} tok/s" for fw in frameworks] + [f"migjax / {p}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tok = r["tok_s"]
        ratio = [tok.get("migjax") / tok[p] if tok.get("migjax") and tok.get(p) else None
                 for p in peers]
        cells = [r["label"]] + [_num(tok.get(fw)) for fw in frameworks] + [_num(x) for x in ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def peer_python(name: str, venvs: str) -> str:
    """The python of `name`'s virtual environment, created and installed when missing or
    installed with other requirements (the list is kept in the environment)."""
    env = os.path.join(venvs, name)
    py, marker = os.path.join(env, "bin", "python"), os.path.join(env, "peer-requirements.txt")
    want = "\n".join(PEERS[name]) + "\n"
    if os.path.exists(py) and os.path.exists(marker) and open(marker).read() == want:
        return py
    print(f"installing {name} into {env}: {' '.join(PEERS[name])} (minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", env], check=True)
    log = os.path.join(env, "install.log")
    with open(log, "w") as fh:
        done = subprocess.run([py, "-m", "pip", "install", *PEERS[name]], stdout=fh,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"installing {name} failed (pip exit {done.returncode}); see {log}")
    with open(marker, "w") as fh:
        fh.write(want)
    return py


class Worker:
    """One framework's phase in its own process: `time()` runs one call there."""

    def __init__(self, fw: str, python: str, phase: str, sizes: dict, log: str):
        self.fw, self.log = fw, log
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [python, os.path.abspath(__file__), "--worker", fw, phase, json.dumps(sizes)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        with open(self.log) as fh:
            tail = fh.read()[-2000:]
        raise RuntimeError(f"{self.fw} worker ended (exit {self.proc.wait()}); {self.log}:\n{tail}")

    def ready(self) -> dict:
        return self._read()

    def time(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def run_phase(phase: str, sizes: dict, pythons: dict, reps: int, logs: str):
    """(seconds per framework, versions, errors) of one phase, the calls interleaved."""
    seconds = {fw: [] for fw in pythons}
    versions, errors, workers = {}, {}, {}
    for fw, py in pythons.items():  # started together: they compile side by side, untimed
        workers[fw] = Worker(fw, py, phase, sizes, os.path.join(logs, f"{phase}.{fw}.log"))
    for fw, w in list(workers.items()):
        try:
            versions[fw] = w.ready()["versions"]
        except RuntimeError as e:
            errors[fw] = str(e)
            del workers[fw]
    for fw in interleaved(list(workers), reps):
        if fw in errors:
            continue
        try:
            seconds[fw].append(workers[fw].time())
        except RuntimeError as e:
            errors[fw] = str(e)
    for w in workers.values():
        w.close()
    return seconds, versions, errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing")
    p.add_argument("--reps", type=int, default=5, help="timed calls per framework and phase")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--venvs", default=os.path.expanduser("~/.cache/migjax-peers"))
    p.add_argument("--out", default="bench_peers.json")
    p.add_argument("--worker", nargs=3, metavar=("FRAMEWORK", "PHASE", "SIZES_JSON"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker[0], a.worker[1], json.loads(a.worker[2]))
    frameworks = [f for f in a.frameworks.split(",") if f]
    phases = [x for x in a.phases.split(",") if x]
    bad = set(frameworks) - set(FRAMEWORKS) or set(phases) - set(PHASES)
    if bad:
        p.error(f"unknown {sorted(bad)}; frameworks {FRAMEWORKS}, phases {PHASES}")
    sizes = SIZES["quick" if a.quick else "full"]
    pythons = {fw: sys.executable if fw == "migjax" else peer_python(fw, a.venvs)
               for fw in frameworks}
    logs = a.out + ".logs"
    os.makedirs(logs, exist_ok=True)
    res = dict(sizes="quick" if a.quick else "full", shapes=sizes, reps=a.reps,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                            loadavg_at_start=os.getloadavg()),
               versions={}, phases={}, errors={})
    rows = []
    for phase in phases:
        print(f"{phase}: {', '.join(frameworks)} x {a.reps}", file=sys.stderr, flush=True)
        s = dict(model=sizes["model"], **sizes[phase])
        seconds, versions, errors = run_phase(phase, s, pythons, a.reps, logs)
        res["versions"].update(versions)
        for fw, e in errors.items():
            res["errors"][f"{phase}/{fw}"] = e
            print(f"{phase}/{fw} failed: {e}", file=sys.stderr)
        rows.append(summarise(phase, sizes[phase], seconds))
        res["phases"][phase] = rows[-1]
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    print(markdown_table(rows, frameworks))
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    return 1 if res["errors"] else 0


# ----------------------------------------------------------------------------- workers
# Each runs under its own framework's python, so its imports stay inside it.


def worker(fw: str, phase: str, s: dict) -> int:
    call, versions = {"migjax": migjax_call, "transformers": transformers_call,
                      "tunix": tunix_call}[fw](phase, s)
    call()  # warm-up: compiles
    emit = lambda obj: print(MARK + json.dumps(obj), flush=True)
    emit({"versions": versions})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t = time.perf_counter()
        call()
        emit({"seconds": time.perf_counter() - t})
    return 0


def migjax_call(phase: str, s: dict):
    import types

    import bench
    import bench_mig
    import jax

    from migjax.models import ModelConfig, init_model, split
    from migjax.train_state import init_state, make_optimizer
    from migjax.update import UpdateHParams, make_update

    m = s["model"]
    cfg = ModelConfig(model_type="qwen2", vocab_size=m["vocab"], hidden_size=m["hidden"],
                      intermediate_size=m["intermediate"], num_layers=m["layers"],
                      num_heads=m["heads"], num_kv_heads=m["kv_heads"], head_dim=m["head_dim"],
                      tie_word_embeddings=True)
    graphdef, params = split(init_model(cfg, 0))
    key, v = jax.random.key(0), cfg.vocab_size
    if phase.startswith("rollout"):
        a = types.SimpleNamespace(gen_batch=s["prompts"], prompt_len=s["prompt_len"],
                                  new_tokens=s["new_tokens"])
        fn = bench.rollout_call(graphdef, params, v, a, key, group_size=s["group"])
    elif phase in ("score", "train"):
        a = types.SimpleNamespace(score_batch=s["batch"], train_batch=s["batch"],
                                  seq_len=s["seq_len"], chunk=256)
        fn = (bench.score_call if phase == "score" else bench.update_call)(
            graphdef, params, v, a, key)
    else:  # grpo: bench_mig's batch and update without the process stream and the SFT term
        a = types.SimpleNamespace(batch=s["prompts"] * s["group"], prompt_len=s["prompt_len"],
                                  completion_len=s["completion_len"], answer_len=4, probe_len=6)
        _, batch = bench_mig.make_inputs(v, a, 4, 4, 0)
        optimizer = make_optimizer(lr=1e-6)
        update = make_update(graphdef, optimizer, UpdateHParams(group_size=s["group"],
                                                                alpha=0.0, gamma=0.0))
        state = [jax.device_put(init_state(params, optimizer), jax.devices()[0])]

        def fn():
            state[0], metrics = update(state[0], batch, None)
            return metrics
    return lambda: jax.block_until_ready(fn()), {"jax": jax.__version__}


def transformers_call(phase: str, s: dict):
    import torch
    import transformers

    m = s["model"]
    cfg = transformers.Qwen2Config(
        vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], head_dim=m["head_dim"], tie_word_embeddings=True,
        rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "attn_implementation": model.config._attn_implementation}
    ints = lambda *shape: torch.randint(LOW, m["vocab"] - LOW, shape)
    if phase.startswith("rollout"):
        model.eval()
        ids = ints(s["prompts"], s["prompt_len"])
        kw = dict(max_new_tokens=s["new_tokens"], min_new_tokens=s["new_tokens"], do_sample=True,
                  temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
                  num_return_sequences=s["group"], attention_mask=torch.ones_like(ids))
        return torch.no_grad()(lambda: model.generate(ids, **kw)), versions
    if phase == "score":
        model.eval()
        x = ints(s["batch"], s["seq_len"])

        @torch.no_grad()
        def score():
            logits = model(x).logits.float()
            return torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])
        return score, versions
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    if phase == "train":
        y = ints(s["batch"], s["seq_len"])
        loss_fn = lambda: model(y, labels=y).loss
    else:  # grpo, as TRL's GRPOTrainer computes it (one step: the old log-probs are the new)
        n, p, c = s["prompts"] * s["group"], s["prompt_len"], s["completion_len"]
        ids, adv = ints(n, p + c), torch.randn(n, 1)

        def loss_fn():
            logits = model(ids, logits_to_keep=c + 1).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None])[..., 0]
            ratio = torch.exp(logp - logp.detach())
            return torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, versions


class _IdTokenizer:
    """Token ids written as decimal words: what Tunix's sampler needs of a tokenizer."""

    def encode(self, text, **kw):
        return [int(w) for w in text.split()]

    def decode(self, ids, **kw):
        return " ".join(map(str, ids))

    def bos_id(self):
        return None  # the sampler prepends none: the prompts are exactly the given tokens

    def eos_id(self):
        return 1

    def pad_id(self):
        return 0


def tunix_call(phase: str, s: dict):
    import importlib.metadata as md

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2

    m = s["model"]
    cfg = qwen2.ModelConfig(num_layers=m["layers"], vocab_size=m["vocab"], embed_dim=m["hidden"],
                            hidden_dim=m["intermediate"], num_heads=m["heads"],
                            head_dim=m["head_dim"], num_kv_heads=m["kv_heads"],
                            rope_theta=10000, norm_eps=1e-6, use_tied_embedding=True)
    model = qwen2.Qwen2(cfg, rngs=nnx.Rngs(0))
    versions = {"tunix": md.version("google-tunix"), "jax": jax.__version__,
                "flax": md.version("flax")}
    rng = jax.random.key(1)
    ints = lambda *shape: jax.random.randint(rng, shape, LOW, m["vocab"] - LOW, jnp.int32)
    if phase.startswith("rollout"):
        from tunix.generate import sampler as sampler_lib

        p, c = s["prompt_len"], s["new_tokens"]
        sampler = sampler_lib.Sampler(model, _IdTokenizer(), sampler_lib.CacheConfig(
            cache_size=p + c, num_layers=m["layers"], num_kv_heads=m["kv_heads"],
            head_dim=m["head_dim"]))
        prompts = [" ".join(map(str, row)) for row in ints(s["prompts"], p).tolist()]
        prompts = [x for x in prompts for _ in range(s["group"])]  # as the GRPO learner does
        kw = dict(max_generation_steps=c, max_prompt_length=p, temperature=1.0, top_p=1.0,
                  eos_tokens=[-1])  # no stop token
        return lambda: sampler(prompts, **kw), versions
    if phase == "score":
        from tunix.rl import common

        graphdef, state = nnx.split(model)
        x = ints(s["batch"], s["seq_len"])
        return lambda: jax.block_until_ready(common.compute_per_token_logps(
            graphdef, state, x[:, :1], x[:, 1:], pad_id=0, eos_id=1)), versions
    optimizer = nnx.Optimizer(model, optax.adamw(1e-6), wrt=nnx.Param)
    if phase == "train":  # the SFT trainer's step (PeftTrainer._train_step) and default loss
        from tunix.generate import utils as gen_utils
        from tunix.sft import peft_trainer

        y = ints(s["batch"], s["seq_len"])
        mask = jnp.ones(y.shape, bool)
        batch = dict(input_tokens=y, input_mask=mask,
                     positions=gen_utils.build_positions_from_mask(mask),
                     attention_mask=gen_utils.make_causal_attn_mask(mask, y.shape[1]))
        loss_fn, has_aux = lambda model, b: peft_trainer._default_loss_fn(model, **b), False
    else:  # grpo: the learner's policy loss, one step (old log-probs = the new, no KL term)
        from tunix.rl import algo_core
        from tunix.rl.grpo import grpo_learner

        algo = grpo_learner.GRPOConfig(num_generations=s["group"], beta=0.0,
                                       loss_agg_mode="token-mean")
        algo.temperature = 1.0  # the learner copies it from the rollout config
        n, p, c = s["prompts"] * s["group"], s["prompt_len"], s["completion_len"]
        ids = ints(n, p + c)
        batch = grpo_learner.TrainExample(
            prompt_ids=ids[:, :p], prompt_mask=jnp.ones((n, p), jnp.int32),
            completion_ids=ids[:, p:], completion_mask=jnp.ones((n, c), jnp.int32),
            advantages=jax.random.normal(rng, (n,)), ref_per_token_logps=None,
            old_per_token_logps=None)
        loss_fn = lambda model, b: algo_core.grpo_loss_fn(model, b, algo, pad_id=0, eos_id=1)
        has_aux = True

    def train_step(model, optimizer, b):
        out, grads = nnx.value_and_grad(loss_fn, has_aux=has_aux)(model, b)
        optimizer.update(model, grads)
        return out[0] if has_aux else out

    step = nnx.jit(train_step, donate_argnames=("optimizer",))
    return lambda: jax.block_until_ready(step(model, optimizer, batch)), versions


if __name__ == "__main__":
    sys.exit(main())
