"""Stage 1 of a run: check the config, load its inputs, compute its identity; then, separately, the weights.

:func:`load_inputs` reads everything but the weights (documents checked, tokenizer,
architecture, the family plugin) and computes the run's identity, so the rule
(:mod:`qkcore.root_policy`) can decide before any weight is read. :func:`load_weights`
is its own step: only a run that captures loads the model.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
import torch

from qkcore import tensor_parallel
from qkcore.config import ConfigError, SniffConfig, resolve_dtype
from qkcore.distributed import Ranks
from qkcore.fsutil import write_text_durably
from qkcore.identity import dataset_fingerprint, run_identity
from qkcore.plugins import Family, resolve_family
from qkcore.run_state import RunIdentity
from qkcore.samplers import Sampler
from qkcore.sources.documents import DocumentCheck, check_columns, check_documents, open_dataset
from qkcore.sources.model import load_architecture, load_model, model_identity, resolve_device
from qkcore.sources.tokenizer import load_tokenizer, tokenizer_identity
from qkcore.stages.plan import build_sampler


@dataclass
class RunInputs:
    """Everything a run needs before its model: checked, loaded, and the run's identity."""

    cfg: SniffConfig
    pm: pluggy.PluginManager
    sampler: Sampler
    device: torch.device
    data: Any
    documents: DocumentCheck
    architecture: Any  # the transformers config, overrides applied
    family: Family
    identity: RunIdentity

    @property
    def run_key(self) -> str:
        return self.identity.key

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use: the identity needs only its files' hashes, so a run the
        rule finds complete never parses it (a GGUF's takes seconds). :func:`load_weights` asks for it
        first, so a broken tokenizer still fails before the slow step."""
        return load_tokenizer(self.cfg.tokenizer, self.cfg.model)


def check_config(cfg: SniffConfig, pm: pluggy.PluginManager) -> Sampler:
    """The checks of a run that need no I/O, beyond the config's own (which ``qkcore plan`` also loads).

    A config that would capture nothing (no kind, no document) loads, so that ``qkcore plan``
    can show it, but a run refuses it here; the sampler is built from the plugins.
    """
    where = cfg.source or "<config>"
    if not cfg.capture.capture_queries and not cfg.capture.capture_keys:
        raise ConfigError(
            f"{where}: capture.capture_queries and capture.capture_keys are both false: nothing would be captured"
        )
    if cfg.dataset.max_samples == 0:
        raise ConfigError(f"{where}: dataset.max_samples: 0 documents would be captured; remove it or set it to at least 1")
    return build_sampler(pm, cfg)


def load_inputs(
    cfg: SniffConfig,
    pm: pluggy.PluginManager,
    ranks: Ranks | None = None,
    hash_cache: dict[str, str] | None = None,
    sampler: Sampler | None = None,
) -> RunInputs:
    """Check and load everything but the model weights, and compute the run's identity.

    ``hash_cache`` maps a file's identity (:mod:`qkcore.filehash`) to its sha256, so unchanged weight
    files are not hashed again (the run keeps it in the data root). ``sampler``: the one
    :func:`check_config` already built, if the caller ran it.
    """
    ranks = ranks or Ranks()
    sampler = sampler or check_config(cfg, pm)
    device = ranks.device(resolve_device(cfg.model.device_map))
    data = open_dataset(cfg.dataset)
    check_columns(data, cfg.dataset)
    documents = check_documents(data, cfg.dataset)
    architecture = load_architecture(cfg.model)
    family = resolve_family(pm, architecture.model_type)
    tensor_parallel.check_architecture(cfg, architecture, family.model_type)  # issue 19: before any weights load
    identity = run_identity(
        cfg,
        dataset=dataset_fingerprint(cfg.dataset),
        model=model_identity(cfg.model, architecture, hash_cache),
        tokenizer=tokenizer_identity(cfg.tokenizer, cfg.model, hash_cache),
        device_type=device.type,
    )
    return RunInputs(cfg, pm, sampler, device, data, documents, architecture, family, RunIdentity.of(identity))


def load_weights(inputs: RunInputs, ranks: Ranks | None = None) -> torch.nn.Module:
    """The model with its weights, on the run's device, in the configured dtype (the slow step of a capture).

    Under tensor parallelism (issue 19) the model is split by heads over ``ranks``' group.
    """
    inputs.tokenizer  # noqa: B018 - loaded now: a broken tokenizer fails before the weights are read
    model_class = inputs.family.hooks.qkcore_model_class(config=inputs.architecture)
    cfg = inputs.cfg
    dtype = resolve_dtype(cfg.model.dtype)
    if ranks is not None and ranks.tensor_parallel_size > 1:  # issue 19
        with tensor_parallel.group_mesh(ranks, inputs.device) as extra:
            return load_model(cfg.model, inputs.architecture, model_class, dtype, inputs.device, extra)
    return load_model(cfg.model, inputs.architecture, model_class, dtype, inputs.device)


class HashCache:
    """sha256 of weight files by identity (:mod:`qkcore.filehash`), kept in the data root: a rerun does not rehash 16 GB."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.values: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.values = {}
        self._before = dict(self.values)

    def save(self) -> None:
        if self.values != self._before and self.path.parent.is_dir():
            write_text_durably(self.path, json.dumps(self.values, indent=1, sort_keys=True))
