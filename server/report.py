"""`facefed-server report`: one self-contained HTML page (plots embedded as PNG) and CSV files of the
same data, from the ledger alone (plus the ROC saved beside each evaluated checkpoint).

Plots: LFW accuracy per round of every run (replays marked; the validation pairs' accuracy dotted, each
run's best checkpoint on them starred: what `current` serves), each site's epsilon per round (replays
marked), the current model's ROC with TAR at FAR 1e-3 and 1e-4, the forget requests' timeline
(received -> erased -> reported -> unlearned -> receipt delivered) and the sites' participation per
round (trained / refused / missing). CSV: rounds.csv, site_rounds.csv, roc.csv, requests.csv.
matplotlib is imported only here (Agg backend: no display needed).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facefed.common.errors import FacefedError
from facefed.server.evaluation import roc_path
from facefed.server.ledger.db import Ledger, refusal_line
from facefed.server.ledger.models import current, latest
from facefed.server.state import StatePaths

FIG_W, FIG_H, DPI = 9.0, 4.0, 100  # every plot is 900 x 400 px
TARGET_FARS = (1e-3, 1e-4)


class ReportError(FacefedError):
    """The report cannot be written (e.g. matplotlib missing); the message says what to install."""


@dataclass
class Report:
    html: Path
    csvs: list[Path] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def tar_at(roc: list[list[float]] | list[tuple[float, float]], far: float) -> float:
    """The best TAR among the ROC's operating points whose FAR is at most `far`."""
    return max((t for f, t in roc if f <= far + 1e-12), default=0.0)


def collect(ledger: Ledger) -> dict[str, Any]:
    """Everything the report shows, as plain rows (also what the CSV files hold)."""
    rounds, site_rounds = [], []
    runs = ledger.runs()
    for run in runs:
        best_row = ledger.best(run.run_id)
        best = best_row.checkpoint_id if best_row else None
        if run.base_metrics and "lfw_accuracy" in run.base_metrics:
            rounds.append(
                {
                    "run": run.run_id,
                    "kind": "base",
                    "round": run.start_round,
                    "attempt": 0,
                    "status": "base",
                    "ended_at": _ts(run.created_at),
                    "lfw_accuracy": run.base_metrics["lfw_accuracy"],
                    "val_accuracy": run.base_metrics.get("val_accuracy"),
                    "checkpoint": run.base_checkpoint,
                    "best": run.base_checkpoint == best,
                }
            )
        for r in ledger.rounds(run.run_id):
            rounds.append(
                {
                    "run": run.run_id,
                    "kind": run.kind,
                    "round": r.round,
                    "attempt": r.attempt,
                    "status": r.status,
                    "ended_at": _ts(r.ended_at),
                    "lfw_accuracy": r.metrics.get("lfw_accuracy"),
                    "val_accuracy": r.metrics.get("val_accuracy"),
                    "checkpoint": r.checkpoint_id or "",
                    "best": r.status == "committed" and r.checkpoint_id == best,
                }
            )
            for s in r.sites:
                site_rounds.append(
                    {
                        "run": run.run_id,
                        "kind": run.kind,
                        "round": r.round,
                        "attempt": r.attempt,
                        "round_status": r.status,
                        "site": s.site,
                        "status": "refused" if refusal_line(s.site, s.detail) else s.status,
                        "epsilon": s.epsilon if s.epsilon is not None and s.epsilon == s.epsilon else None,
                        "delta": s.delta if s.delta is not None and s.delta == s.delta else None,
                        "unit": s.unit or "",
                        "detail": s.detail or "",
                    }
                )
    requests = []
    for q in ledger.requests():
        issued = (q.receipt or {}).get("issued_at") if q.receipt else None
        requests.append(
            {
                "request": q.request_id,
                "site": q.site,
                "status": q.status,
                "received_at": _ts(q.received_at),
                "erased_at": _ts(q.erased_at),
                "reported_at": _ts(q.reported_at),
                "unlearned_at": str(issued or ""),
                "delivered_at": _ts(q.delivered_at),
                "replay_run": q.replay_run_id or "",
                "model": q.model_checkpoint or "",
                "detail": q.detail or "",
                "_t": [q.received_at, q.erased_at, q.reported_at, _epoch(issued), q.delivered_at],
            }
        )
    model = current(ledger)
    roc: dict[str, Any] | None = None
    if len(model) == 1 and roc_path(model[0].path).is_file():
        roc = json.loads(roc_path(model[0].path).read_text())
    return {
        "runs": runs,
        "rounds": rounds,
        "site_rounds": site_rounds,
        "requests": requests,
        "model": [m.checkpoint_id for m in model],
        "latest": [m.checkpoint_id for m in latest(ledger)],
        "roc": roc,
    }


def _epoch(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(id, title, base64 PNG) per plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ReportError(f"the report needs matplotlib ({e}); install it: pip install 'matplotlib>=3.8'") from None
    out = []
    size = (FIG_W, FIG_H)

    # Accuracy per round, per run; replays dashed.
    fig, ax = plt.subplots(figsize=size)
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in data["rounds"]:
        if r["lfw_accuracy"] is not None and r["status"] in ("committed", "base"):
            by_run.setdefault(r["run"], []).append(r)
    kinds = {run.run_id: run.kind for run in data["runs"]}
    for run_id, rows in by_run.items():
        rows.sort(key=lambda r: r["round"])
        replay = kinds.get(run_id) == "replay"
        (line,) = ax.plot(
            [r["round"] for r in rows],
            [100 * r["lfw_accuracy"] for r in rows],
            "--s" if replay else "-o",
            label=f"{run_id} (replay)" if replay else run_id,
        )
        val = [r for r in rows if r["val_accuracy"] is not None]
        if val:
            ax.plot(
                [r["round"] for r in val],
                [100 * r["val_accuracy"] for r in val],
                ":",
                color=line.get_color(),
                label=f"{run_id} (validation)",
            )
        for r in rows:
            if r["best"]:
                ax.plot([r["round"]], [100 * r["lfw_accuracy"]], "*", color=line.get_color(), markersize=16)
                ax.annotate(
                    f"best: {r['checkpoint']}",
                    (r["round"], 100 * r["lfw_accuracy"]),
                    xytext=(-6, 6),
                    textcoords="offset points",
                    ha="right",
                    fontsize=7,
                )
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("LFW accuracy (%)")
    ax.set_title("Accuracy per round: test pairs (replays dashed), validation dotted, best on validation starred")
    if by_run:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(("accuracy", "Accuracy per round", _png(fig)))

    # Epsilon per round per site; replays marked.
    fig, ax = plt.subplots(figsize=size)
    series: dict[tuple[str, bool], list[tuple[int, float]]] = {}
    for s in data["site_rounds"]:
        if s["status"] == "ok" and s["epsilon"] is not None and s["epsilon"] >= 0:
            series.setdefault((s["site"], s["kind"] == "replay"), []).append((s["round"], s["epsilon"]))
    for (site, replay), pts in sorted(series.items()):
        pts.sort()
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            "x--" if replay else "o-",
            label=f"{site} (replay)" if replay else site,
        )
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("epsilon (cumulative, per site)")
    ax.set_title("Privacy spent per site (replays marked x, dashed)")
    if series:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(("epsilon", "Epsilon per round per site", _png(fig)))

    # ROC of the current model.
    fig, ax = plt.subplots(figsize=size)
    roc = data["roc"]
    if roc:
        far = [max(p[0], 1e-5) for p in roc["roc"]]
        ax.plot(far, [p[1] for p in roc["roc"]], "-", label=f"{', '.join(data['model'])}")
        for f in TARGET_FARS:
            ax.axvline(f, color="grey", ls=":", lw=1)
            ax.annotate(f"TAR@FAR={f:g}: {100 * tar_at(roc['roc'], f):.1f}%", (f, 0.05), fontsize=8, rotation=90)
        ax.set_xscale("log")
        ax.set_xlim(1e-5, 1)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no evaluated current model", ha="center", va="center")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("ROC of the current model (LFW " + (roc["pairs"] if roc else "-") + ")")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(("roc", "ROC of the current model", _png(fig)))

    # Forget requests timeline.
    fig, ax = plt.subplots(figsize=size)
    steps = ("received", "erased", "reported", "unlearned", "receipt")
    marks = ("o", "s", "^", "D", "*")
    t0 = min((t for q in data["requests"] for t in q["_t"] if t), default=0.0)
    for i, q in enumerate(data["requests"]):
        ts = [(t - t0) if t else None for t in q["_t"]]
        known = [(k, t) for k, t in enumerate(ts) if t is not None]
        ax.plot([t for _, t in known], [i] * len(known), "-", color="grey", lw=1)
        for k, t in known:
            ax.plot([t], [i], marks[k], label=steps[k] if i == 0 else None, markersize=8)
    ax.set_yticks(range(len(data["requests"])), [f"{q['request'][:14]} ({q['site']})" for q in data["requests"]])
    ax.set_xlabel("seconds since the first request was received")
    ax.set_title("Forget requests: received -> erased -> reported -> unlearned -> receipt")
    if data["requests"]:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no forget requests", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(("requests", "Forget requests timeline", _png(fig)))

    # Participation: sites x round attempts.
    fig, ax = plt.subplots(figsize=size)
    cols = sorted({(s["run"], s["round"], s["attempt"]) for s in data["site_rounds"]}, key=lambda c: (c[0], c[1], c[2]))
    sites = sorted({s["site"] for s in data["site_rounds"]})
    code = {"ok": 2, "refused": 1}
    grid = [[0] * len(cols) for _ in sites]
    for s in data["site_rounds"]:
        grid[sites.index(s["site"])][cols.index((s["run"], s["round"], s["attempt"]))] = code.get(s["status"], 0)
    if cols and sites:
        from matplotlib.colors import ListedColormap

        ax.imshow(grid, aspect="auto", cmap=ListedColormap(["#d9d9d9", "#d62728", "#2ca02c"]), vmin=0, vmax=2)
        ax.set_yticks(range(len(sites)), sites)
        ax.set_xticks(range(len(cols)), [f"r{c[1]}.{c[2]}" for c in cols], fontsize=7, rotation=90)
    else:
        ax.text(0.5, 0.5, "no rounds yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Participation per round attempt: trained (green), refused (red), missing (grey)")
    fig.tight_layout()
    out.append(("participation", "Sites' participation", _png(fig)))
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def write_report(paths: StatePaths, out: Path) -> Report:
    """Write DIR/report.html and the CSV files; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    with Ledger(paths.ledger) as ledger:
        data = collect(ledger)
    plots = _plots(data)
    csvs = [
        _write_csv(out / "rounds.csv", data["rounds"], list(data["rounds"][0]) if data["rounds"] else ["run"]),
        _write_csv(
            out / "site_rounds.csv",
            data["site_rounds"],
            ["run", "kind", "round", "attempt", "round_status", "site", "status", "epsilon", "delta", "unit", "detail"],
        ),
        _write_csv(
            out / "requests.csv",
            data["requests"],
            [k for k in (data["requests"][0] if data["requests"] else {"request": 0}) if not k.startswith("_")],
        ),
        _write_csv(
            out / "roc.csv",
            [{"far": f, "tar": t} for f, t in (data["roc"] or {}).get("roc", [])],
            ["far", "tar"],
        ),
    ]
    roc = data["roc"]
    tars = (
        " ".join(f"<li>TAR at FAR {f:g}: <b>{100 * tar_at(roc['roc'], f):.2f} %</b></li>" for f in TARGET_FARS)
        + f"<li>{roc['n_pairs']} pairs of {html.escape(roc['pairs'])}: with fewer impostor pairs than 1/FAR, "
        "the lowest FARs are bounded by the sample</li>"
        if roc
        else "<li>no ROC: the current model was not evaluated</li>"
    )
    refusals = [
        f"<li>{html.escape(s['run'])} round {s['round']}.{s['attempt']}: "
        f"{html.escape(refusal_line(s['site'], s['detail']) or '')}</li>"
        for s in data["site_rounds"]
        if s["status"] == "refused"
    ]
    imgs = "\n".join(
        f'<section><h2>{html.escape(title)}</h2><img id="{pid}" class="plot" alt="{html.escape(title)}" '
        f'width="{int(FIG_W * DPI)}" height="{int(FIG_H * DPI)}" src="data:image/png;base64,{b64}"></section>'
        for pid, title, b64 in plots
    )
    runs = "".join(
        f"<tr><td>{html.escape(r.run_id)}</td><td>{r.kind}</td><td>{r.status}</td>"
        f"<td>{html.escape(r.best_checkpoint or '')}</td><td>{html.escape(r.detail or '')}</td></tr>"
        for r in data["runs"]
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>facefed report: {html.escape(paths.root.name)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:auto;padding:1em}} img{{border:1px solid #ccc}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 6px;font-size:90%}}</style></head>
<body>
<h1>facefed report</h1>
<p>State <code>{html.escape(str(paths.root))}</code>, written {_ts(dt.datetime.now().timestamp())}.
Current model (the best on the validation pairs, what <code>export --model current</code> writes):
<b>{html.escape(", ".join(data["model"]) or "none")}</b>; latest: {html.escape(", ".join(data["latest"]) or "none")}.
Data as CSV: {" ".join(f'<a href="{p.name}">{p.name}</a>' for p in csvs)}.</p>
<ul>{tars}</ul>
{imgs}
<h2>Runs</h2><table><tr><th>run</th><th>kind</th><th>status</th><th>best on validation</th><th>detail</th></tr>
{runs}</table>
<h2>Site refusals</h2><ul>{"".join(refusals) or "<li>none</li>"}</ul>
<pre id="render-check"></pre>
<script>
window.addEventListener("load", function () {{
  var out = [];
  document.querySelectorAll("img.plot").forEach(function (i) {{
    out.push(i.id + " " + (i.complete ? i.naturalWidth : 0) + "x" + (i.complete ? i.naturalHeight : 0));
  }});
  document.getElementById("render-check").textContent = out.join("\\n");
}});
</script>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return Report(path, csvs, [p[0] for p in plots])
