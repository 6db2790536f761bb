#!/usr/bin/env python
"""Rebuild ``devils-dictionary.jsonl`` from Debian's ``dict-devil`` package (see DEVILS-DICTIONARY.md).

    apt-get download dict-devil && dpkg -x dict-devil_*_all.deb /tmp/dict-devil
    python configs/demo/build_devils_dictionary.py /tmp/dict-devil/usr/share/dictd/devil.dict.dz

The text from the preface on is cut at entry boundaries into documents of at
least ``--min-chars`` characters (about 4 characters per SmolLM2 token), and the
first ``--documents`` of them are written, one JSON object per line:
``{"id": "devil-01", "title": "PREFACE - ACKNOWLEDGE", "text": ...}``. The only
change to the text is dropping the ``{...}`` braces Debian's dictd conversion
put around five cross-references.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

ENTRY = re.compile(r"^([A-Z][A-Z'. -]*[A-Z.]), ", re.MULTILINE)  # "ABASEMENT, n.  ..."


def paragraphs(text: str) -> list[str]:
    """The book from its preface on, as blank-line separated blocks."""
    start = text.index("PREFACE")
    body = text[text.rfind("\n", 0, start) + 1:].replace("{", "").replace("}", "")
    return [block for block in re.split(r"\n\s*\n", body) if block.strip()]


def documents(blocks: list[str], min_chars: int) -> list[tuple[str, str]]:
    """(title, text) chunks of whole entries, each at least ``min_chars`` long (the last may be shorter)."""
    chunks: list[tuple[str, str]] = []
    current: list[str] = []
    first = last = "PREFACE"
    for block in blocks:
        match = ENTRY.match(block)
        if match and current and sum(len(b) + 2 for b in current) >= min_chars:
            chunks.append((f"{first} - {last}", "\n\n".join(current)))
            current, first = [], match.group(1)
        if match:
            last = match.group(1)
        current.append(block.rstrip())
    if current:
        chunks.append((f"{first} - {last}", "\n\n".join(current)))
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dict_dz", type=Path, help="devil.dict.dz from the dict-devil package")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("devils-dictionary.jsonl"))
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--min-chars", type=int, default=11_000)
    args = parser.parse_args()
    text = gzip.open(args.dict_dz, "rt", encoding="utf-8").read()  # dictzip is gzip-compatible
    chunks = documents(paragraphs(text), args.min_chars)[: args.documents]
    with args.out.open("w", encoding="utf-8") as handle:
        for number, (title, body) in enumerate(chunks, 1):
            handle.write(json.dumps({"id": f"devil-{number:02d}", "title": title, "text": body}) + "\n")
    print(f"wrote {len(chunks)} documents to {args.out}")


if __name__ == "__main__":
    main()
