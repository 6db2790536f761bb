"""Loading the tokenizer: a hub id, a local directory, or the built-in offline byte tokenizer."""

from __future__ import annotations

from typing import Any

from qkcore.errors import QkcoreError

#: ``tokenizer.name`` of the offline tokenizer: one token per UTF-8 byte, plus specials.
BYTE_TOKENIZER = "qkcore:bytes"


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


def load_tokenizer(tokenizer_cfg: Any, model_cfg: Any) -> Any:
    """Return a tokenizer with a pad token, per ``tokenizer.*`` (falling back to ``model.name``)."""
    from transformers import AutoTokenizer

    name = tokenizer_cfg.name or model_cfg.name
    if name == BYTE_TOKENIZER:
        tokenizer = byte_tokenizer()
    elif not name:
        raise QkcoreError("tokenizer.name: required when the model is built from model.config")
    else:
        # The tokenizer may live in another repo than the model (e.g. checkpoint branches):
        # only its own revision applies, never model.revision.
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name, revision=tokenizer_cfg.revision, trust_remote_code=tokenizer_cfg.trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise QkcoreError(f"tokenizer.name: cannot load tokenizer '{name}': {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
