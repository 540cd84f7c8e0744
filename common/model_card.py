"""A model card (README.md) written beside a saved model: what it is, how it was made, its key metrics and how
to load it. The scripts pass values; this module only lays them out."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from common.io import write_text_atomic

CARD_FILE = "README.md"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value) or "-"
    return "-" if value is None else str(value)


def model_card(title: str, summary: str, method: Mapping[str, Any], metrics: Mapping[str, Any] | None,
               load: str, notes: Sequence[str] = ()) -> str:
    """The card's Markdown: a title and one-paragraph summary, a table of how the model was made (`method`:
    label -> value), a table of metrics (if evaluated), the loading code (`load`: Python) and extra notes."""
    lines = [f"# {title}", "", summary, "", "## How it was made", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_value(value)} |" for name, value in method.items()]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_value(value)} |" for name, value in metrics.items()]
    lines += ["", "## How to load it", "", "```python", load.strip(), "```"]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_model_card(output_dir: str, title: str, summary: str, method: Mapping[str, Any],
                     metrics: Mapping[str, Any] | None, load: str, notes: Sequence[str] = ()) -> str:
    """Write README.md into the model folder (rank 0 only); returns its path."""
    path = os.path.join(output_dir, CARD_FILE)
    write_text_atomic(path, model_card(title, summary, method, metrics, load, notes))
    return path
