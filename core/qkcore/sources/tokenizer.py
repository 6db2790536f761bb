"""Loading the tokenizer: a hub id, a local directory, a GGUF file's, or the built-in offline byte tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkcore.errors import QkcoreError
from qkcore.sources.gguf import gguf_path, load_error, locate_gguf, require_gguf_support
from qkcore.sources.locations import check_hub_repo, file_sha256, files_sha256, hub_commit, pinned_revision, source_kind

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qkcore.config import ModelConfig, TokenizerConfig

#: ``tokenizer.name`` of the offline tokenizer: one token per UTF-8 byte, plus specials.
BYTE_TOKENIZER = "qkcore:bytes"
#: Bump whenever :func:`byte_tokenizer` could turn a text into other ids.
BYTE_TOKENIZER_VERSION = 1

#: Files of a local tokenizer directory that decide how a text is tokenised
#: (chat templates do not, so they are left out of the identity).
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built offline (vocab 256 bytes + ``<pad>``, ``<bos>``, ``<eos>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<bos>", "<eos>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def uses_gguf_tokenizer(tokenizer_cfg: TokenizerConfig, model_cfg: ModelConfig) -> bool:
    """True when the tokenizer comes from ``model.gguf_file`` (``tokenizer.name`` unset or equal to ``model.name``)."""
    return bool(model_cfg.gguf_file) and tokenizer_cfg.name in (None, model_cfg.name)


def load_tokenizer(tokenizer_cfg: TokenizerConfig, model_cfg: ModelConfig) -> Any:
    """Return a tokenizer with a pad token, per ``tokenizer.*`` (falling back to ``model.name``)."""
    from transformers import AutoTokenizer

    name = tokenizer_cfg.name or model_cfg.name
    if name == BYTE_TOKENIZER:
        tokenizer = byte_tokenizer()
    elif uses_gguf_tokenizer(tokenizer_cfg, model_cfg):
        require_gguf_support("model.gguf_file")
        location = locate_gguf(model_cfg)
        revision = None if location.local else pinned_revision(location.folder, model_cfg.revision)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location.folder, gguf_file=location.file, revision=revision)
        except (OSError, ValueError, KeyError) as exc:
            raise load_error(location, "tokenizer", exc) from exc
    elif not name:
        raise QkcoreError("tokenizer.name: required when the model is built from model.config")
    else:
        key = _name_key(name, model_cfg)
        local = source_kind(name, key) == "local"
        if not local:
            check_hub_repo(name, tokenizer_cfg.revision, key)
        # The tokenizer may live in another repo than the model (e.g. checkpoint branches):
        # only its own revision applies, never model.revision.
        revision = tokenizer_cfg.revision if local else pinned_revision(name, tokenizer_cfg.revision)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name, revision=revision, trust_remote_code=tokenizer_cfg.trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise QkcoreError(f"tokenizer.name: cannot load tokenizer '{name}': {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenizer_identity(tokenizer_cfg: TokenizerConfig, model_cfg: ModelConfig, hash_cache: dict[str, str] | None = None) -> dict[str, Any]:
    """What pins how texts become token ids, as a JSON-able dict.

    Built-in byte tokenizer: its name and version. GGUF: the file's name and sha256.
    Hub: the repo and the commit ``tokenizer.revision`` resolves to. Local directory:
    the sha256 of its tokenizer files. ``hash_cache`` as in
    :func:`~qkcore.sources.model.model_identity`. Raises if a Hub commit cannot be resolved.
    """
    name = tokenizer_cfg.name or model_cfg.name
    if name == BYTE_TOKENIZER:
        return {"source": "builtin", "name": BYTE_TOKENIZER, "version": BYTE_TOKENIZER_VERSION}
    if uses_gguf_tokenizer(tokenizer_cfg, model_cfg):
        path = gguf_path(locate_gguf(model_cfg), model_cfg.revision)
        return {"source": "gguf", "file": path.name, "sha256": file_sha256(path, hash_cache)}
    if not name:
        raise QkcoreError("tokenizer.name: required when the model is built from model.config")
    key = _name_key(name, model_cfg)
    if source_kind(name, key) == "hub":
        check_hub_repo(name, tokenizer_cfg.revision, key)  # the error load_tokenizer gives, before it is ever called
        return {"source": "hub", "repo": name, "commit": hub_commit(name, tokenizer_cfg.revision, "tokenizer.revision")}
    folder = Path(os.path.expanduser(name))
    files = [f for f in _TOKENIZER_FILES if (folder / f).is_file()] + [p.name for p in folder.glob("*.tiktoken")]
    if tokenizer_cfg.trust_remote_code:
        files += [p.name for p in folder.glob("*.py")]
    if not files:
        raise QkcoreError(f"tokenizer.name: no tokenizer files in {folder.resolve()} (expected e.g. tokenizer.json)")
    return {"source": "local", "files": files_sha256(folder, files, hash_cache)}


def _name_key(name: str, model_cfg: ModelConfig) -> str:
    """The config key that named the tokenizer: the model's name when the tokenizer is the model's (what the user wrote)."""
    return "model.name" if name == model_cfg.name and model_cfg.config is None else "tokenizer.name"
