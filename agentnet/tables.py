"""Markdown tables for reports, experiment summaries and docs, and which way a reported metric is better."""

from __future__ import annotations

from typing import Literal, Sequence

__all__ = ["markdown_table", "direction"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table from a header and rows of cell strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def direction(column: str) -> Literal[1, -1] | None:
    """Which way a metric is better: ``1`` higher (ACC, BWT, FWT, ``*_acc``; their ``val_``
    versions), ``-1`` lower (``*_error``, ``*_loss``, forgetting), ``None`` for columns that are not
    compared (``wall_s``, ``samples_per_s``, experiment entries of unknown sense). The report and
    the tuner read it alike."""
    name = column.removeprefix("val_")
    if name in ("ACC", "BWT", "FWT") or name.endswith(("_acc", "_ACC")) or name == "acc":
        return 1
    if name == "forgetting" or name.endswith(("_error", "_loss")) or name in ("error", "loss"):
        return -1
    return None
