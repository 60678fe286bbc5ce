"""What the notebooks show and keep: inline loss plots (also saved as PNG), tables, and a metrics JSON per stage."""
from __future__ import annotations

import json
import time
from pathlib import Path


def plot_losses(curves: dict[str, dict], title: str, path: str | Path | None = None, hline: float | None = None,
                hline_label: str | None = None):
    """Plot one or more loss curves ``{label: {"step": [...], "loss": [...]}}``; save to `path`; show inline."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, curve in curves.items():
        ax.plot(curve["step"], curve["loss"], marker="." if len(curve["step"]) < 40 else None, label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=hline_label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_and_show(fig, path)


def save_and_show(fig, path: str | Path | None = None, dpi: int = 110):
    """The one way the course keeps a figure: saved as `path` (folders made; nothing saved when None), then
    shown inline. Returns `fig`."""
    import matplotlib.pyplot as plt

    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    plt.show()
    return fig


def write_metrics(directory: str | Path, stage: str, metrics: dict) -> Path:
    """Write ``<directory>/<stage>.json`` (merging with what is there) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stage}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(metrics)
    old["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path.write_text(json.dumps(old, indent=2, sort_keys=True, default=float))
    return path


def show_table(rows: list[dict], columns: list[str] | None = None, max_rows: int = 20):
    """Render a list of dicts as an HTML table in a notebook (plain text elsewhere)."""
    columns = columns or list(rows[0]) if rows else []
    rows = rows[:max_rows]
    try:
        from IPython.display import HTML, display

        head = "".join(f"<th>{c}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{r.get(c, '')}</td>" for c in columns) + "</tr>" for r in rows)
        display(HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"))
    except ImportError:  # pragma: no cover
        for r in rows:
            print(" | ".join(str(r.get(c, "")) for c in columns))
