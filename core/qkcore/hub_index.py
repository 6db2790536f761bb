"""The index of run branches on a Hub repo's ``main``: what every branch holds, kept by every push.

The Hub's dataset viewer shows a repo's ``main`` only, and qkcore puts each run on a branch of
its own; so ``main``'s ``README.md`` lists the run branches (model, revision, run key, configs,
rows, dataset, date, and the ``load_dataset`` line of each). :func:`update_index` adds or
updates one branch's entry in **one commit that touches only main's README**:

* the README is read at main's head commit and the commit is made with ``parent_commit`` set
  to it, so a push that raced another one (both read the same head) fails with a conflict
  instead of overwriting the other's entry; it then reads the new head and tries again, so
  racing pushes lose no entry;
* entries of branches that no longer exist are dropped; a README without the index (a new
  repo, or one the lab wrote) keeps its words, the index is appended between two markers.

The entries also travel in machine-readable form (JSON inside an HTML comment between the
markers), which :func:`read_index` parses for ``qkcore compare owner/repo``.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import structlog

from qkcore.errors import QkcoreError
from qkcore.layout import CARD_FILE

__all__ = ["IndexEntry", "parse_index", "read_index", "render_index", "update_index"]

log = structlog.get_logger(__name__)

START = "<!-- qkcore:index:start -->"
END = "<!-- qkcore:index:end -->"
_DATA = "<!-- qkcore:index "
#: Attempts of one index update when other pushes keep moving main meanwhile.
CONFLICT_ATTEMPTS = 12
_CONFLICT_STATUS = (409, 412)


@dataclass(frozen=True)
class IndexEntry:
    """One run branch as the index lists it (``None``: the branch's card does not say)."""

    branch: str
    model: str | None = None
    revision: str | None = None
    run_key: str | None = None
    configs: int = 0
    rows: int | None = None
    dataset: str | None = None
    date: str | None = None
    #: A query config the branch holds, for its ``load_dataset`` line (head sampling may skip l00h00q).
    example_config: str = "l00h00q"

    @classmethod
    def from_card(cls, branch: str, card_text: str | None) -> IndexEntry:
        """The entry of ``branch`` whose card (the run's ``README.md``) is ``card_text``."""
        from qkcore.analysis.provenance import RunFacts

        facts = RunFacts.from_card(card_text)
        queries = [name for name in facts.configs if name.endswith("q")]
        return cls(branch, facts.model, facts.revision, facts.run_key, len(facts.configs), facts.rows,
                   facts.dataset, facts.created, queries[0] if queries else "l00h00q")


def parse_index(text: str | None, where: str = "main README.md") -> list[IndexEntry]:
    """The entries of the index in a README (``[]`` when it has none); a damaged one is one clear error."""
    if not text or START not in text:
        return []
    section = text.split(START, 1)[1].split(END, 1)[0]
    begin = section.find(_DATA)
    if begin < 0:
        return []
    payload = section[begin + len(_DATA):].split("-->", 1)[0]
    try:
        data = json.loads(payload)
        names = {f.name for f in fields(IndexEntry)}
        return [IndexEntry(**{k: v for k, v in item.items() if k in names}) for item in data["runs"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise QkcoreError(
            f"{where}: the qkcore index is damaged ({exc}); delete the text between {START} and {END} "
            "and push again (every push rewrites its own entry)"
        ) from None


def _cell(value: Any) -> str:
    return "?" if value is None or value == "" else str(value).replace("|", "\\|")


def render_index(repo_id: str, entries: list[IndexEntry], existing: str | None) -> str:
    """``existing`` (main's README, or the default one when ``None``) with its index section set to ``entries``."""
    from qkcore.hub import main_branch_readme

    rows = [
        "| branch | model | revision | run key | configs | rows | dataset | date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    loads = []
    for e in sorted(entries, key=lambda e: e.branch):
        rows.append(f"| `{e.branch}` | {_cell(e.model)} | {_cell(e.revision)} | {_cell(e.run_key)} | {e.configs} | "
                    f"{_cell(e.rows)} | {_cell(e.dataset)} | {_cell(e.date)} |")
        loads.append(f'load_dataset("{repo_id}", "{e.example_config}", revision="{e.branch}", split="train")')
    payload = json.dumps({"runs": [asdict(e) for e in sorted(entries, key=lambda e: e.branch)]}, sort_keys=True)
    section = "\n".join([
        START,
        "## Run branches",
        "",
        "Kept by qkcore: every push updates this list (do not edit between the markers).",
        "",
        *rows,
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        *loads,
        "```",
        "",
        f"{_DATA}{payload} -->",
        END,
    ])
    text = existing if existing is not None else main_branch_readme(repo_id)
    if START in text and END in text.split(START, 1)[1]:
        before, rest = text.split(START, 1)
        return before + section + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def _main_readme(api: Any, repo_id: str, commit: str) -> str | None:
    """main's README at ``commit``, or ``None`` when it has none."""
    from huggingface_hub.errors import EntryNotFoundError

    with tempfile.TemporaryDirectory(prefix="qkcore-index-") as folder:
        try:
            path = api.hf_hub_download(repo_id, CARD_FILE, repo_type="dataset", revision=commit, cache_dir=folder)
        except EntryNotFoundError:
            return None
        return Path(path).read_text(encoding="utf-8")


def update_index(api: Any, repo_id: str, entry: IndexEntry, *, attempts: int = CONFLICT_ATTEMPTS) -> str | None:
    """Put ``entry`` into main's index in one commit touching only ``README.md``; return the commit (``None``: unchanged).

    Retries from a fresh read when another writer moved main in between (HTTP 409/412 on
    ``parent_commit``), at most ``attempts`` times; other failures are raised as they come.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, attempts + 1):
        refs = api.list_repo_refs(repo_id, repo_type="dataset")
        branches = {ref.name: ref.target_commit for ref in refs.branches}
        head = branches.get("main")
        if head is None:
            raise QkcoreError(f"hub {repo_id}: the repo has no main branch to hold the index of run branches")
        existing = _main_readme(api, repo_id, head)
        entries = {e.branch: e for e in parse_index(existing, f"{repo_id}@main README.md") if e.branch in branches}
        entries[entry.branch] = entry
        text = render_index(repo_id, list(entries.values()), existing)
        if text == existing:
            return None
        try:
            info = api.create_commit(
                repo_id, repo_type="dataset", revision="main", parent_commit=head,
                operations=[CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=text.encode("utf-8"))],
                commit_message=f"qkcore: index of run branches ({entry.branch})",
            )
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in _CONFLICT_STATUS or attempt == attempts:
                raise
            log.info("main moved while the index was updated; reading it again", repo=repo_id, attempt=attempt)
            time.sleep(random.uniform(0.05, 0.3) * attempt)  # two racing pushes must not retry in lockstep
            continue
        log.info("index of run branches updated", repo=repo_id, branch=entry.branch, commit=info.oid)
        return info.oid
    return None  # pragma: no cover - the loop returns or raises


def read_index(repo_id: str, api: Any = None) -> list[IndexEntry]:
    """The run branches main's index lists; one clear error when the repo or its index cannot be read."""
    from huggingface_hub import HfApi

    api = api if api is not None else HfApi()
    try:
        refs = api.list_repo_refs(repo_id, repo_type="dataset")
        head = next((ref.target_commit for ref in refs.branches if ref.name == "main"), None)
        text = _main_readme(api, repo_id, head) if head else None
    except QkcoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, 404, 401 and network failures all end here
        raise QkcoreError(f"{repo_id}: not a folder here, and the Hub repo could not be read "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    entries = parse_index(text, f"{repo_id}@main README.md")
    if not entries:
        raise QkcoreError(
            f"{repo_id}: main's README has no qkcore index of run branches (pushed before qkcore kept one?); "
            f"name the runs as {repo_id}@BRANCH, or push one run again to write the index"
        )
    return entries
