"""Close the loop: a real (tiny) capture is the input of the plasticity analysis.

Tiny random Qwen2 with one full and one sliding layer → ``qkcore sniff`` (uniform
sampler) → ``qkcore plasticity``: the outputs exist, every captured query head is
reported, and the key pairs drawn from the captured rows obey the causal and
sliding-window rules the downstream contract describes.
"""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq

from qkcore.analysis.pairs import KeyIndex, sample_key_pairs
from qkcore.cli import main
from qkcore.layout import parse_config_name
from tests.conftest import write_corpus

WINDOW = 48
QWEN2 = {
    "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259, "max_position_embeddings": 1024,
    "use_sliding_window": True, "sliding_window": WINDOW, "layer_types": ["full_attention", "sliding_attention"],
}
TEXT = "The river gauge reports its level every fifteen minutes; engineers read the curve. "


def test_sniff_then_plasticity_on_the_captured_dataset(tiny_config, tmp_path, capsys) -> None:
    corpus = write_corpus(tmp_path / "long.jsonl", [(f"d{i}", TEXT * (3 + i)) for i in range(6)])
    config = tiny_config(
        QWEN2,
        dataset={"path": str(corpus)},
        tokenizer={"max_length": 512},
        capture={"sampler": {"type": "uniform", "base_rate": 16}, "min_bucket_size": 32},
    )
    assert main(["sniff", "--config", str(config)]) == 0
    root = tmp_path / "out"
    out = tmp_path / "plasticity"
    assert main(["plasticity", str(root), "--out", str(out), "--pairs-per-bucket", "64", "--workers", "1",
                 "--no-progress"]) == 0
    assert (out / "plasticity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    captured_q = {(l, h) for name in (p.name for p in root.iterdir()) if (parsed := parse_config_name(name))
                  for l, h, kind in [parsed] if kind == "q"}
    with (out / "head_metrics.csv").open() as handle:
        heads = list(csv.DictReader(handle))
    assert {(int(r["layer"]), int(r["q_head"])) for r in heads} == captured_q
    assert {int(r["sliding_window"]) for r in heads if r["sliding_window"] not in ("", "None")} == {WINDOW}
    with (out / "head_bucket_plasticity.csv").open() as handle:
        buckets = list(csv.DictReader(handle))
    values = [float(r["plasticity"]) for r in buckets if r["plasticity"] not in ("", "nan")]
    assert values and all(0.0 <= v <= 1.0 for v in values)
    assert all(r["reason"] for r in [*buckets, *heads] if r["plasticity"] == "nan")
    # The capture's card records the family's GQA mapping; the analysis pairs heads by it.
    assert "By the card's key_head_of_query" in (out / "README.md").read_text(encoding="utf-8")
    assert {(int(r["q_head"]), int(r["k_head"])) for r in heads} == {(q, q // 2) for _, q in captured_q}

    # Pair rules on the real captured keys of the sliding layer.
    keys = pq.read_table(root / "l01h00k" / "data.parquet").to_pydict()
    bucket = np.array(keys["bucket"])
    position = np.array(keys["position"])
    example = np.array(keys["example_id"])
    assert set(keys["sliding_window"]) == {WINDOW}
    index = KeyIndex.build(bucket, example, position)
    rng = np.random.default_rng(0)
    for t in sorted(set(bucket.tolist()))[1:]:
        start = int(position[bucket == t].min())
        pairs = sample_key_pairs(index, t, 200, rng, window=WINDOW, bucket_start=start)
        for k1, k2 in pairs:
            assert example[k1] == example[k2] and k1 != k2
            for k in (k1, k2):
                assert bucket[k] < t, "causal: keys only from earlier buckets"
                assert position[k] > start - WINDOW, "sliding: only keys a query of the bucket can attend to"
