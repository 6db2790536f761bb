"""The correctness oracle on real trained weights: SmolLM2-135M, 30 layers, GQA 9 over 3, head_dim 64.

With sampler ``all`` every position of every head is written; softmax(q·kᵀ/8 +
causal) recomputed from the rows must equal the probabilities the model itself
returns in eager mode. On random weights attention is nearly uniform and hides
many mistakes; trained heads are sharp (sinks, previous-token heads), so a
shifted position, a wrong RoPE stage or a mis-mapped key head shows at once.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qkcore.config import load_config
from qkcore.example_ids import normalize_example_id, to_int32
from qkcore.sniff import run_sniff
from tests.acceptance.conftest import CORPUS, HEAD_DIM, KEY_HEADS, LAYERS, QUERY_HEADS, write_config

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

GROUP = QUERY_HEADS // KEY_HEADS
SCALE = HEAD_DIM**-0.5  # 1/8: a power of two, exact in every dtype


def _documents(tokenizer, max_length: int, n: int = 2) -> dict[str, torch.Tensor]:
    """The first ``n`` demo documents as the run tokenises them (truncated to ``max_length``)."""
    with CORPUS.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(n), handle)]
    return {
        row["id"]: torch.tensor([tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]])
        for row in rows
    }


class _Rows:
    """Each config's rows read once, as numpy (the runs write 360 configs)."""

    def __init__(self, root) -> None:
        self.root, self.tables = root, {}

    def __call__(self, config: str, example_id: str) -> tuple[np.ndarray, np.ndarray]:
        if config not in self.tables:
            table = pq.read_table(self.root / config / "data.parquet")
            vectors = table.column("vector").combine_chunks()
            self.tables[config] = (
                table.column("example_id").to_numpy(), table.column("position").to_numpy(),
                vectors.flatten().to_numpy().reshape(len(vectors), -1),
            )
        ids, positions, vectors = self.tables[config]
        keep = ids == to_int32(normalize_example_id(example_id))
        order = np.argsort(positions[keep], kind="stable")
        return positions[keep][order], vectors[keep][order]


def _recomputed(rows: _Rows, layer: int, q_head: int, example_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, scores) recomputed in float32 from the written rows of one query head."""
    positions, q = rows(f"l{layer:02d}h{q_head:02d}q", example_id)
    k_positions, k = rows(f"l{layer:02d}h{q_head // GROUP:02d}k", example_id)
    assert positions.tolist() == k_positions.tolist() == list(range(len(positions)))
    scores = torch.from_numpy(q) @ torch.from_numpy(k).T * SCALE
    causal = torch.ones(len(positions), len(positions), dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1), scores


def _eager(model, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [a[0].float() for a in model.model(input_ids=ids, use_cache=False, output_attentions=True).attentions]


#: max |dP| allowed per attention implementation of the run (the reference is always eager).
#: eager: the run's forward is the reference's, so only the capture can differ (measured: 0).
#: sdpa: the run's hidden states differ from eager's by kernel rounding that grows through
#: the layers (measured 1e-6..7e-6 on layers 0-28, 4.7e-5 on the sharp heads of layer 29).
TOLERANCE = {"eager": 1e-5, "sdpa": 1e-4}


@pytest.mark.parametrize("attn", sorted(TOLERANCE))
def test_fp32_rows_reproduce_eager_attention_on_every_layer(smollm2, reference_model, preloaded, tmp_path, attn) -> None:
    model, tokenizer = reference_model
    cfg = load_config(write_config(tmp_path, model={"attn_implementation": attn}))
    result = run_sniff(cfg)
    assert len(result.rows) == LAYERS * (QUERY_HEADS + KEY_HEADS)
    documents = _documents(tokenizer, cfg.tokenizer.max_length)
    rows = _Rows(result.data_root)
    worst = np.zeros(LAYERS)
    for example_id, ids in documents.items():
        assert result.rows["l00h00q"] >= ids.shape[1] == 512
        reference = _eager(model, ids)
        for layer in range(LAYERS):
            for q_head in range(QUERY_HEADS):
                recomputed, _ = _recomputed(rows, layer, q_head, example_id)
                worst[layer] = max(worst[layer], (recomputed - reference[layer][q_head]).abs().max().item())
    assert worst.max() <= TOLERANCE[attn], {layer: f"{d:.2e}" for layer, d in enumerate(worst) if d > TOLERANCE[attn]}


def test_pre_rope_rows_equal_the_q_and_k_projections(smollm2, reference_model, preloaded, tmp_path) -> None:
    """Llama has no per-head norm: pre-RoPE rows are q_proj / k_proj outputs split into heads."""
    model, tokenizer = reference_model
    layers = [0, 14, 29]
    # Eager attention and batch 1 in both, so every earlier layer computed exactly the same.
    cfg = load_config(write_config(
        tmp_path, model={"attn_implementation": "eager"}, dataset={"max_samples": 1},
        capture={"capture_pre_rope": True, "layers": layers},
    ))
    result = run_sniff(cfg)
    rows = _Rows(result.data_root)
    (example_id, ids), = _documents(tokenizer, cfg.tokenizer.max_length, n=1).items()
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [
        getattr(model.model.layers[layer].self_attn, f"{kind}_proj").register_forward_hook(
            lambda module, args, output, key=(layer, kind): seen.__setitem__(key, output[0].detach().clone())
        )
        for layer in layers for kind in ("q", "k")
    ]
    try:
        _eager(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers:
        for kind, heads in (("q", QUERY_HEADS), ("k", KEY_HEADS)):
            projected = seen[(layer, kind)].view(ids.shape[1], heads, HEAD_DIM)
            for head in range(heads):
                positions, vectors = rows(f"l{layer:02d}h{head:02d}{kind}", example_id)
                assert positions.tolist() == list(range(ids.shape[1]))
                torch.testing.assert_close(torch.from_numpy(vectors), projected[:, head], rtol=0, atol=0)


def test_bf16_rows_reproduce_bf16_eager_attention_on_the_same_batch(smollm2, reference_model, preloaded, tmp_path) -> None:
    """bfloat16, compared with a bfloat16 eager forward of the same single-document batch.

    bf16 results depend on the batch shape (other kernels, other rounding), and the
    differences grow through 30 layers; with the same batch and eager attention in
    both, the run's q and k are the reference's bit for bit, and what remains is
    how the probabilities are computed from them:

    * eager rounds the scores to bf16 (8 mantissa bits): a score ``s`` is off by at
      most ``|s| * 2**-9``; the row's shift cancels in the softmax, so ``p_ij`` moves by
      at most a factor ``exp(2 * max_j |s_ij| * 2**-9)``;
    * eager rounds the probabilities to bf16: another relative ``2**-9``.

    So per element ``|dp| <= p * (exp(2**-8 * max|s| + 2**-9) - 1)``, checked with a
    factor 2 of margin for the CPU bf16 matmul's own blocked accumulation (measured:
    up to 1.35x the single-rounding bound; max |dp| about 0.012 at scores up to 15).
    A wrong position, RoPE stage or key head moves sharp heads' p by O(1).
    """
    model, tokenizer = reference_model
    # What load_model(bfloat16) returns: weights dequantized then cast; RoPE's inv_freq buffers
    # stay float32 (model.to(bfloat16) would round them too, and every rotation with them).
    reference_bf16 = copy.deepcopy(model)
    for parameter in reference_bf16.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    cfg = load_config(write_config(
        tmp_path, model={"dtype": "bfloat16", "attn_implementation": "eager"}, capture={"layers": [0, 1, 14, 28, 29]},
    ))
    result = run_sniff(cfg)
    rows = _Rows(result.data_root)
    checked = 0
    for example_id, ids in _documents(tokenizer, cfg.tokenizer.max_length).items():
        reference = _eager(reference_bf16, ids)
        for layer in cfg.capture.layers:
            for q_head in range(QUERY_HEADS):
                recomputed, scores = _recomputed(rows, layer, q_head, example_id)
                expected = reference[layer][q_head]
                row_max = scores.masked_fill(scores == float("-inf"), 0).abs().amax(dim=-1, keepdim=True)
                bound = 2 * torch.maximum(recomputed, expected) * torch.expm1(row_max * 2**-8 + 2**-9)
                excess = (recomputed - expected).abs() - bound
                assert excess.max().item() <= 1e-6, (layer, q_head, example_id, excess.max().item())
                checked += 1
    assert checked == 2 * 5 * QUERY_HEADS
