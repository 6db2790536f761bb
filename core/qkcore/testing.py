"""A test kit for qkcore plugins: capture a tiny random model, check the rows against the model itself.

The central check is the oracle, :func:`assert_rows_match_eager`. With sampler
``all`` a run writes every position of every head, so softmax(q·kᵀ·scale + causal
mask [+ sliding window]) recomputed from the written rows must equal the attention
probabilities the *same* random model returns in eager mode
(:func:`eager_reference`). A mis-mapped head, a wrong RoPE stage, a shifted
position or a missing sliding-window mask makes it fail.

Everything runs offline on the CPU: the model is built with random weights from an
inline architecture dict (the run config's ``model.config``) through the family
plugin's own model class and backbone, and text goes through the byte tokenizer
``qkcore:bytes`` (so the architecture needs ``vocab_size >= 259``). A plugin's own
tests need only this module and the plugin.

It is also an opt-in pytest plugin (as pytest's own ``pytester`` is): load it with
``pytest_plugins = ["qkcore.testing"]`` in a test module or the root ``conftest.py``,
or ``pytest -p qkcore.testing``, and the tests get its fixtures:

* ``qk_eager_reference(architecture, **model)``: :func:`eager_reference`, built once per
  session for the same arguments and shared (so a module needs no fixture of its own);
* ``qk_capture(architecture, **sections)``: :func:`sniff`, run once per session for the
  same arguments and shared: read its data root, never change it;
* ``qk_sniff(architecture, **sections)``: :func:`sniff` into the test's own ``tmp_path``;
* ``qk_run_config(architecture, **sections)``: :func:`write_run_config` into ``tmp_path``.

::

    from qkcore.testing import capture_all, tiny_architecture

    pytest_plugins = ["qkcore.testing"]
    ARCH = tiny_architecture("my_family", sliding_window=8)

    def test_rows_reproduce_eager_attention(qk_eager_reference, qk_capture):
        reference = qk_eager_reference(ARCH)
        result = qk_capture(ARCH, capture=capture_all())
        assert reference.check(result.data_root) == 2 * 8 * len(reference.attentions)  # layers x heads x documents

Pass ``pm=`` (a :func:`qkcore.plugins.make_plugin_manager` with your module
registered) to test a plugin before it is installed as a package.

PYTEST_DONT_REWRITE: a test module imports this kit before pytest loads it as a
plugin, too late to rewrite its asserts; its failures carry their own messages.
"""

from __future__ import annotations

import functools
import json
import random
import re
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from pluggy import PluginManager

from qkcore.capture import CapturePlan
from qkcore.config import load_config
from qkcore.example_ids import normalize_example_id
from qkcore.layers import AttentionLayer, text_decoder
from qkcore.layout import config_file, config_name, low32, parse_config_name
from qkcore.plugins import Family, make_plugin_manager, resolve_family
from qkcore.sniff import SniffResult, run_sniff
from qkcore.meta_model import on_meta_device
from qkcore.sources.model import architecture_config, load_architecture, load_model
from qkcore.sources.tokenizer import load_tokenizer

#: An inline architecture: a transformers config as a dict, ``model_type`` included (``model.config``).
Architecture = dict[str, Any]
#: A corpus: ``(example id, text)`` pairs.
Corpus = Sequence[tuple[Any, str]]

#: The default corpus: 26 to 101 bytes, string and integer ids. The longest documents
#: outrun a window of 8 or 16 tokens, so a missing sliding mask shows.
TEXTS: Corpus = (
    ("doc-a", "Stakes drilled into the glacier show how much ice melted over the summer."),
    ("doc-b", "The harbour master keeps a log of every vessel that enters after dusk, with lantern counts."),
    (12, "Flour arrives on Tuesdays."),
    ("doc-d", "A relay station forwards messages it cannot read; it checks only the envelope and the hop counter."),
    (99, "Readers in the archive use pencils only, and every box is returned before the next is issued."),
)

#: Tiny sizes for an architecture dict: GQA with 8 query heads over 2 key/value heads, head_dim 16,
#: two layers, and the byte tokenizer's vocabulary and special tokens.
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 259,  # the byte tokenizer's vocabulary
    "max_position_embeddings": 2048,
    "pad_token_id": 256,  # the byte tokenizer's <pad>, <bos>, <eos>
    "bos_token_id": 257,
    "eos_token_id": 258,
}

#: A real LlamaConfig, shrunk: three layers, GQA 4 query heads per key head, head_dim 8, the byte
#: tokenizer's vocabulary (the repository's default test model; ``model.config`` of :func:`write_run_config`).
TINY_LLAMA: Architecture = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 259,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "pad_token_id": 256,
}

#: Phrases that say rows are post-RoPE; a pre-RoPE run's card notes must contain none.
POST_ROPE_CLAIM = re.compile(r"after rotary embedding|after RoPE|post-RoPE", re.IGNORECASE)


def tiny_architecture(model_type: str, **overrides: Any) -> Architecture:
    """An inline architecture dict (``model.config``) for ``model_type`` with :data:`TINY_SIZES`."""
    return {"model_type": model_type, **TINY_SIZES, **overrides}


def capture_all(**capture: Any) -> dict[str, Any]:
    """A ``capture`` section keeping every position of every head (the oracle's premise), updated by ``capture``."""
    return {"sampler": {"type": "all"}, "head_sampling": None, **capture}


def write_corpus(path: Path, texts: Corpus = TEXTS) -> Path:
    """Write ``texts`` as a JSON-lines corpus (``id``, ``text``) to ``path``; return ``path``."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for example_id, text in texts:
            handle.write(json.dumps({"id": example_id, "text": text}) + "\n")
    return Path(path)


def write_run_config(folder: Path, architecture: Architecture, *, texts: Corpus = TEXTS, **sections: Any) -> Path:
    """Write a run config for ``architecture`` into ``folder`` and return its path.

    The run reads ``folder/corpus.jsonl`` (``texts``), builds the model with random
    weights in float32 on the CPU, tokenizes with ``qkcore:bytes`` (max_length 512),
    captures with sampler ``all`` and writes to ``folder/out``. Each of ``sections``
    (``model=``, ``capture=``, ``inference=``, ...) updates that section's defaults.
    """
    folder = Path(folder)
    corpus = write_corpus(folder / "corpus.jsonl", texts)
    config: dict[str, Any] = {
        "dataset": {"path": str(corpus), "text_column": "text", "id_column": "id"},
        "model": {"name": "test/tiny", "config": architecture, "dtype": "float32", "device_map": "cpu"},
        "tokenizer": {"name": "qkcore:bytes", "max_length": 512},
        "inference": {"batch_size": 2},
        "capture": {"sampler": {"type": "all"}, "min_bucket_size": 16},
        "output": {"data_root": str(folder / "out")},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def sniff(
    folder: Path, architecture: Architecture, *, texts: Corpus = TEXTS, pm: PluginManager | None = None, **sections: Any
) -> SniffResult:
    """Capture ``architecture`` into a fresh folder under ``folder``; return the run's result.

    ``sections`` update the config of :func:`write_run_config` (``model=`` keeps
    ``model.config = architecture``); ``pm`` replaces the installed plugins.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="run", dir=folder))
    return run_sniff(load_config(write_run_config(run_dir, architecture, texts=texts, **sections)), pm)


@dataclass
class EagerReference:
    """The tiny model a run builds, in eager attention, and what it computes for each document."""

    model: torch.nn.Module
    backbone: torch.nn.Module
    family: Family
    #: The family's description of the model's attention layers (``qkcore_attention_layers``).
    layers: list[AttentionLayer]
    #: Example id -> attention probabilities ``(heads, seq, seq)``, one per attention call.
    attentions: dict[Any, list[torch.Tensor]]
    #: Example id -> input ids ``(1, seq)``.
    inputs: dict[Any, torch.Tensor]

    def layer(self, index: int) -> AttentionLayer:
        """The layer with decoder index ``index``."""
        return next(layer for layer in self.layers if layer.index == index)

    def key_head(self, layer: int, query_head: int) -> int:
        """The key head ``query_head`` of layer ``layer`` attends with: the family's ``qkcore_key_head``."""
        described = self.layer(layer)
        return self.family.key_head(query_head, described.num_query_heads, described.num_key_value_heads)

    def check(self, root: Path, **kwargs: Any) -> int:
        """Run the oracle on every query config under ``root``; return the (query head, document) pairs checked.

        The scale is each attention module's own ``scaling``; each query head's key head
        is the family's own mapping (:meth:`key_head`, as the run used it). ``kwargs`` go
        to :func:`assert_rows_match_eager` (``softcap=``, ``query_transform=``, ...).
        """
        return sum(
            assert_rows_match_eager(
                root,
                self.attentions,
                scaling=lambda index: float(self.layer(index).module.scaling),
                key_head=functools.partial(self.key_head, layer.index),
                layers={layer.index},
                **kwargs,
            )
            for layer in self.layers
        )


def eager_reference(
    folder: Path, architecture: Architecture, *, texts: Corpus = TEXTS, pm: PluginManager | None = None, **model: Any
) -> EagerReference:
    """Build ``architecture`` as a run would (plugin's class and backbone, same seed), in eager mode.

    Each document of ``texts`` goes through the backbone with ``output_attentions=True``;
    ``model`` adds settings of the ``model`` section (e.g. ``config_overrides=``), as in the run.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="reference", dir=folder))
    cfg = load_config(write_run_config(run_dir, architecture, texts=texts, model=model))
    config = load_architecture(cfg.model)
    family = resolve_family(pm or make_plugin_manager(), config.model_type)
    model_class = family.hooks.qkcore_model_class(config=config)
    model = load_model(cfg.model, config, model_class, torch.float32, torch.device("cpu"))
    model.set_attn_implementation("eager")
    backbone = family.hooks.qkcore_backbone(model=model)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    attentions, inputs = {}, {}
    with torch.no_grad():
        for example_id, text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            out = backbone(input_ids=ids, use_cache=False, output_attentions=True)
            attentions[example_id] = [a[0] for a in out.attentions]
            inputs[example_id] = ids
    layers = family.hooks.qkcore_attention_layers(model=model)
    return EagerReference(model, backbone, family, layers, attentions, inputs)


def meta_model(architecture: Architecture, *, pm: PluginManager | None = None) -> tuple[torch.nn.Module, Family]:
    """``architecture`` built by its family's model class on the meta device, and the family.

    No weights and no compute: enough to ask the structural hooks (layers, RoPE sites,
    card notes) about any size of model in milliseconds, not to run it. Built as
    ``qkcore plan`` builds it (:func:`qkcore.meta_model.on_meta_device`).
    """
    config = architecture_config(architecture)
    family = resolve_family(pm or make_plugin_manager(), config.model_type)
    return on_meta_device(config, family), family


def read_rows(root: Path, config: str, example_id: Any) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
    """Positions (sorted), vectors ``(n, head_dim)`` and ``sliding_window`` values of one example in one config."""
    table = pq.read_table(Path(root) / config_file(config)).to_pydict()
    wanted = low32(normalize_example_id(example_id))
    keep = [i for i, e in enumerate(table["example_id"]) if e == wanted]
    positions = np.array([table["position"][i] for i in keep], dtype=np.int64)
    vectors = np.array([table["vector"][i] for i in keep], dtype=np.float32).reshape(len(keep), -1)
    windows = [table["sliding_window"][i] for i in keep]
    order = np.argsort(positions, kind="stable")
    return positions[order], vectors[order], [windows[i] for i in order]


def rows(root: Path, layer: int, head: int, kind: str, example_id: Any) -> np.ndarray:
    """The vectors of one example in config ``lXXhYY{kind}``, ordered by position."""
    _, vectors, _ = read_rows(root, config_name(layer, head, kind), example_id)
    return vectors


def sliding_window_values(root: Path, config: str) -> set[int | None]:
    """The distinct values of one written config's ``sliding_window`` column."""
    table = pq.read_table(Path(root) / config_file(config), columns=["sliding_window"])
    return set(table.column(0).to_pylist())


def rope_tables(model: torch.nn.Module, length: int, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The text decoder's own ``(cos, sin)`` for positions ``0..length-1`` (``args``: e.g. a layer type)."""
    rotary = text_decoder(model).rotary_emb
    return rotary(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None], *args)


def assert_rows_match_eager(
    root: Path,
    attentions: dict[Any, list[torch.Tensor]],
    *,
    scaling: Callable[[int], float],
    key_head: Callable[[int], int],
    softcap: float | None = None,
    query_transform: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    attention_index: Callable[[int], int] = lambda layer: layer,
    atol: float = 2e-6,
    layers: Collection[int] | None = None,
) -> int:
    """Check every ``lXXhYYq`` config under ``root`` against eager attention.

    Returns the number of (query head, document) pairs checked. ``layers`` limits the
    check to those decoder indices (every layer when ``None``).

    For each query config and each example of ``attentions``, the rows must hold every
    position, and softmax(q·kᵀ·``scaling(layer)`` [tanh soft-capped] + causal mask
    [+ the rows' ``sliding_window``]) must equal ``attentions[example_id][i][head]``,
    where ``i = attention_index(layer)`` (e.g. skipping cross-attention layers, which
    eager attentions leave out in a text-only forward). Keys come from
    ``lXXh{key_head(q)}k``. ``query_transform(layer, q, positions)`` re-applies what the
    family does to the query after the captured stage (e.g. a position-dependent scale).
    """
    checked = 0
    for config_dir in sorted(Path(root).iterdir()):
        parsed = parse_config_name(config_dir.name)
        if parsed is None or parsed[2] != "q":
            continue
        layer, q_head, _ = parsed
        if layers is not None and layer not in layers:
            continue
        for example_id, per_layer in attentions.items():
            expected = per_layer[attention_index(layer)][q_head]
            positions, q, windows = read_rows(root, config_dir.name, example_id)
            k_positions, k, _ = read_rows(root, config_name(layer, key_head(q_head), "k"), example_id)
            length = expected.shape[-1]
            if not positions.tolist() == list(range(length)) == k_positions.tolist():
                raise AssertionError(
                    f"{config_dir.name} example {example_id}: expected every position 0..{length - 1}, got "
                    f"{len(positions)} query and {len(k_positions)} key rows"
                )
            q_t = torch.from_numpy(q)
            if query_transform is not None:
                q_t = query_transform(layer, q_t, torch.from_numpy(positions))
            scores = q_t @ torch.from_numpy(k).T * scaling(layer)
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            i = torch.arange(length)[:, None]
            j = torch.arange(length)[None, :]
            allowed = j <= i
            window = windows[0] if windows else None
            if window is not None:
                allowed &= (i - j) < window
            scores = scores.masked_fill(~allowed, float("-inf"))
            torch.testing.assert_close(
                torch.softmax(scores, dim=-1), expected, atol=atol, rtol=1e-5,
                msg=lambda m: f"{config_dir.name} example {example_id}: {m}",
            )
            checked += 1
    return checked


def expected_sampled_configs(eligible_layers: list[int], num_q: int, num_kv: int, count: int, seed: int) -> list[str]:
    """Config names for ``count`` query heads sampled as the protocol defines it, plus their GQA key heads.

    Written independently of :mod:`qkcore.heads`: candidates layer-major, heads ascending,
    ``random.Random(seed).sample``; key head = ``q // (num_q // num_kv)``.
    """
    candidates = [(layer, head) for layer in eligible_layers for head in range(num_q)]
    chosen = random.Random(seed).sample(candidates, count) if len(candidates) > count else candidates
    names = {config_name(layer, head, "q") for layer, head in chosen}
    names |= {config_name(layer, head // (num_q // num_kv), "k") for layer, head in chosen}
    return sorted(names)


def card_notes(
    model: torch.nn.Module, family: Family, *, pre_rope: bool = False, unscaled_queries: bool = False
) -> list[str]:
    """The family's dataset-card notes for ``model``, rendered for a run at the given RoPE stage.

    The plan carries the RoPE site the family declares for every layer, as a run's does.
    """
    layers = family.hooks.qkcore_attention_layers(model=model)
    rope_sites = {layer.index: family.hooks.qkcore_locate_rope(model=model, layer=layer) for layer in layers}
    plan = CapturePlan(layers={}, heads={}, pre_rope=pre_rope, rope_sites=rope_sites, unscaled_queries=unscaled_queries)
    return [note for provided in family.hooks.qkcore_card_notes(model=model, layers=layers, plan=plan)
            for note in provided or []]


def post_rope_claims(notes: Sequence[str]) -> list[str]:
    """The notes that say rows are post-RoPE (:data:`POST_ROPE_CLAIM`): none may appear in a pre-RoPE run."""
    return [note for note in notes if POST_ROPE_CLAIM.search(note)]


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored afterwards).

    Tiny models' matrices are a few dozen wide, so threads buy nothing; on a busy
    machine OpenMP workers spin-waiting for a core make such tests several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- pytest plugin
# ``pytest_plugins = ["qkcore.testing"]`` or ``pytest -p qkcore.testing`` (see the module docstring).


R = TypeVar("R")


def _shared(tmp_path_factory: pytest.TempPathFactory, prefix: str,
            build: Callable[..., R]) -> Callable[..., R]:
    """A session-wide factory around ``build(folder, architecture, *, texts, pm, **rest)``.

    Calls with the same arguments (a plugin manager by identity) get the same result,
    built once in a fresh folder named ``{prefix}-{model_type}``.
    """
    built: dict[str, R] = {}

    def shared(architecture: Architecture, *, texts: Corpus = TEXTS, pm: PluginManager | None = None,
               **rest: Any) -> R:
        key = json.dumps([architecture, [list(text) for text in texts], id(pm) if pm is not None else None, rest],
                         sort_keys=True, default=repr)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{prefix}-{architecture.get('model_type', 'model')}")
            built[key] = build(folder, architecture, texts=texts, pm=pm, **rest)
        return built[key]

    return shared


@pytest.fixture(scope="session")
def qk_eager_reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., EagerReference]:
    """Factory ``qk_eager_reference(architecture, *, texts=TEXTS, pm=None, **model)``: a shared :func:`eager_reference`.

    Built once per session for the same arguments; every test that asks for it gets the same object.
    """
    return _shared(tmp_path_factory, "eager", eager_reference)


@pytest.fixture(scope="session")
def qk_capture(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SniffResult]:
    """Factory ``qk_capture(architecture, *, texts=TEXTS, pm=None, **sections)``: a shared :func:`sniff`.

    Run once per session for the same arguments; tests share the result, so read its
    data root and never change it (use ``qk_sniff`` for a run of the test's own).
    """
    return _shared(tmp_path_factory, "capture", sniff)


@pytest.fixture
def qk_sniff(tmp_path: Path) -> Callable[..., SniffResult]:
    """Factory ``qk_sniff(architecture, *, texts=TEXTS, pm=None, **sections)``: :func:`sniff` under ``tmp_path``."""

    def run(architecture: Architecture, *, texts: Corpus = TEXTS, pm: PluginManager | None = None,
            **sections: Any) -> SniffResult:
        return sniff(tmp_path, architecture, texts=texts, pm=pm, **sections)

    return run


@pytest.fixture
def qk_run_config(tmp_path: Path) -> Callable[..., Path]:
    """Factory ``qk_run_config(architecture=TINY_LLAMA, *, texts=TEXTS, **sections)``: a run config in ``tmp_path``."""

    def write(architecture: Architecture | None = None, *, texts: Corpus = TEXTS, **sections: Any) -> Path:
        return write_run_config(tmp_path, architecture or TINY_LLAMA, texts=texts, **sections)

    return write
