"""scripts/bench_peers.py's pure parts: the sizes and pins it promises, tokens per call, the
interleaved order, medians and the table. Nothing here installs or runs a peer."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "bench_peers", os.path.join(ROOT, "scripts", "bench_peers.py"))
bp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bp)


def test_sizes_and_pins():
    full = bp.SIZES["full"]
    assert full["model"] == dict(vocab=32000, hidden=256, intermediate=768, layers=4, heads=4,
                                 kv_heads=2, head_dim=64)
    assert [bp.tokens_per_call(ph, full[ph]) for ph in bp.PHASES] == [
        16 * 128, 4 * 4 * 128, 8 * 512, 4 * 512, 16 * (64 + 128)]
    assert bp.label("rollout_group", full["rollout_group"]) == "rollout 4 x G4 x (64 + 128)"
    assert set(bp.SIZES["quick"]) == set(full)
    # any other torch pin downloads a CUDA build
    assert bp.PEERS["transformers"] == ("torch==2.13.0", "transformers")
    assert bp.PEERS["tunix"] == ("google-tunix==0.1.7", "jax==0.10.2", "flax==0.12.8")


def test_calls_go_round_the_frameworks():
    assert bp.interleaved(["migjax", "transformers", "tunix"], 2) == [
        "migjax", "transformers", "tunix", "migjax", "transformers", "tunix"]
    assert bp.interleaved(["migjax"], 0) == []


def test_medians_and_table():
    s = dict(batch=2, seq_len=50)  # 100 tokens per call
    row = bp.summarise("score", s, {"migjax": [3.0, 1.0, 2.0], "transformers": [4.0, 5.0],
                                    "tunix": []})
    assert row["median_s"] == {"migjax": 2.0, "transformers": 4.5, "tunix": None}
    assert row["tok_s"] == {"migjax": 50.0, "transformers": 100 / 4.5, "tunix": None}
    table = bp.markdown_table([row], ["migjax", "transformers", "tunix"])
    assert table.splitlines() == [
        "| phase | migjax tok/s | transformers tok/s | tunix tok/s | migjax / transformers "
        "| migjax / tunix |",
        "|---|---|---|---|---|---|",
        "| scoring 2 x 50 | 50 | 22.22 | - | 2.25 | - |",
    ]
