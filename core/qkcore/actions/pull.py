"""The ``pull`` action: the Hub branch holds this very run; download it instead of capturing it again."""

from __future__ import annotations

import structlog

from qkcore.actions.context import RunContext
from qkcore.card import ModelEntry, card_models, read_card
from qkcore.errors import QkcoreError
from qkcore.fsutil import remove_tree
from qkcore.hub import BranchState
from qkcore.layout import CARD_FILE, MANIFEST_FILE
from qkcore.manifest import Manifest, read_manifest
from qkcore.output import Record, file_entry
from qkcore.run_state import RunIdentity, RunSummary, SniffResult
from qkcore.stages.push import hub_target

log = structlog.get_logger(__name__)


def pull(ctx: RunContext, identity: RunIdentity, branch: BranchState) -> SniffResult:
    """Download the run from the branch into the final folder, verified file by file, and publish it."""
    hub = ctx.hub
    assert hub is not None
    root, final = ctx.root, ctx.root.final_dir
    remove_tree(final)
    final.mkdir(parents=True)
    hub.download(branch, [MANIFEST_FILE], final)
    manifest = read_manifest(final / MANIFEST_FILE)
    if manifest is None or manifest.run_key != identity.key:
        raise QkcoreError(f"the Hub branch {hub.where} has no manifest for run {identity.key}; use --replace to capture it again")
    wanted = manifest.published_files()
    hub.download(branch, sorted(wanted), final)
    for name, expected in wanted.items():
        if not expected.matches(file_entry(final / name)):
            raise QkcoreError(f"{name} pulled from {hub.where} does not match its manifest; the branch is damaged")
    files = {name: file_entry(final / name) for name in [*wanted, MANIFEST_FILE]}
    record = Record("publishing", manifest.identity, files,
                    summary=_summary_of_card((final / CARD_FILE).read_text(encoding="utf-8"), manifest),
                    hub=hub_target(hub, branch.commit))
    record = root.publish(record)
    log.info("pulled: the Hub branch already holds this run", branch=hub.where, configs=len(manifest.configs))
    return ctx.result(record, "pulled")


def _summary_of_card(card: str, manifest: Manifest) -> RunSummary:
    """A pulled run's summary, from its card (model, date) and manifest (counts)."""
    models = card_models(read_card(card))
    try:
        entry = ModelEntry.from_json(models[0]) if models else None
    except ValueError as exc:
        raise QkcoreError(f"the pulled {CARD_FILE} has an unreadable qkcore.models entry ({exc}); the branch is damaged") from None
    return RunSummary(model=entry.name if entry else None, created=entry.created if entry else None,
                      documents=manifest.documents, tokens=manifest.tokens)
