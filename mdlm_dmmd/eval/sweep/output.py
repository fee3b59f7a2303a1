"""A sweep's outputs: `results.csv` (every row, every metric with its standard error),
`results.md` (one table per metric shaped like the paper's Tables 2/5, rows = method, columns =
NFE; then every row with value ± stderr), `nfe_<metric>.png`, and the trade-off scatters
`gen_ppl_vs_entropy.png` and `gm_vs_gen_ppl.png` when both of their metrics are present.

Row names follow the paper: "Masked teacher (p = 0.85)", "Uniform D-MMD (p = 0.70/0.70)"
(distillation/sampling top-p).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mdlm_dmmd.eval import plots, tables
from mdlm_dmmd.eval.scoring import describe
from mdlm_dmmd.eval.tables import as_number, markdown_table, value_stderr

FIRST_COLUMNS = ["method", "label", "source", "steps", "distill_top_p", "top_p", "temperature"]
# nfe: network calls per sequence in all; entropy_redraws: samples re-drawn by BD3-LM's rule (when on)
LAST_COLUMNS = ["nfe", "entropy_redraws", "num_samples", "sample_seconds", "checkpoint"]


def row_label(row: dict) -> str:
    """Table/legend name: "Masked teacher (p = 0.85)", "Masked D-MMD (p = 0.85/1.00)" (distillation/
    sampling top-p), temperature when not 1, "(quoted)" for copied numbers; "Data" as is."""
    if row.get("source") == "data":
        return str(row["method"])
    parts = []
    top_p, distill = row.get("top_p"), row.get("distill_top_p")
    if top_p not in (None, ""):
        parts.append(f"p = {float(distill):.2f}/{float(top_p):.2f}" if distill not in (None, "") else f"p = {float(top_p):.2f}")
    temperature = row.get("temperature")
    if temperature not in (None, "") and float(temperature) != 1.0:
        parts.append(f"T = {float(temperature):g}")
    label = str(row["method"]) + (f" ({', '.join(parts)})" if parts else "")
    return label + (" (quoted)" if row.get("source") == "quoted" else "")


def all_metrics(metrics: list[str], rows: list[dict]) -> list[str]:
    """`metrics`, then every extra metric column the rows hold (a metric's own `columns`, e.g.
    fd_<space> and kid_<space> of frechet), in the order they first appear."""
    known = set(FIRST_COLUMNS) | set(LAST_COLUMNS) | {"note", "label", "source"} | set(metrics)
    extra = [k for row in rows for k in row if k not in known and not k.endswith("_stderr")]
    return list(metrics) + list(dict.fromkeys(extra))


def write_csv(run_dir: Path, rows: list[dict], metrics: list[str]) -> None:
    """`results.csv`: the row keys, each metric with its standard error, how it was sampled."""
    columns = FIRST_COLUMNS + [c for m in metrics for c in (m, f"{m}_stderr")] + LAST_COLUMNS + ["note"]
    tables.write_csv(run_dir / "results.csv", ({**row, "label": row.get("label") or row_label(row)} for row in rows),
                     columns)


def nfe_table(rows: list[dict], metric: str) -> list[str]:
    """Markdown table of `metric`: one row per method label, one column per NFE (Tables 2/5);
    rows without steps (Data) fill a last "—" column."""
    having = [r for r in rows if as_number(r.get(metric)) is not None]
    steps = sorted({int(r["steps"]) for r in having if r.get("steps") not in (None, "")})
    stepless = any(r.get("steps") in (None, "") for r in having)
    header = [str(s) for s in steps] + (["—"] if stepless else [])
    lines = []
    for label in dict.fromkeys(r["label"] for r in having):
        cells = {("—" if r.get("steps") in (None, "") else str(int(r["steps"]))): value_stderr(as_number(r.get(metric)))
                 for r in having if r["label"] == label}
        lines.append([label, *(cells.get(h, "") for h in header)])
    return markdown_table(["method", *header], lines)


def write_markdown(run_dir: Path, cfg: DictConfig, rows: list[dict], metrics: list[str], pictures: list[str],
                   length: int) -> None:
    """`results.md`: how the rows were made, one NFE table per metric, then every row."""
    options = cfg.eval.get("metric_options")
    options = OmegaConf.to_container(options, resolve=True) if options else {}
    literature = cfg.sweep.get("literature_csv")
    lines = [
        f"# Sweep on {cfg.data.name}",
        "",
        f"Each measured row: {int(cfg.sweep.num_samples)} samples of {int(cfg.sampling.get('length') or length)} tokens, "
        f"seed {int(cfg.sampling.seed)}, "
        f"scored with {', '.join(cfg.eval.metrics or [])}"
        + (f" (options: `{options}`)" if options else "") + ". "
        "NFE = sampling steps (network calls; the AR baseline makes L; for block-diffusion models the steps are "
        "per block and the `nfe` column of results.csv counts all blocks; with `sampling.noise_removal=greedy_tail` "
        "each k steps make one more call, which `nfe` counts and the tables' step columns do not). "
        "\"(p = 0.85)\": sampled with top-p 0.85; \"(p = 0.85/1.00)\": a student distilled with teacher top-p 0.85, "
        "sampled with top-p 1.00. \"Data\": the metrics of held-out data sequences themselves."
        + (f" Rows marked (quoted) are copied from `{literature}`, not measured." if literature else ""),
        "",
    ]
    registered = set(cfg.eval.metrics or [])
    for metric in metrics:
        if any(as_number(r.get(metric)) is not None for r in rows):
            # a registered metric's heading says what it measures here (e.g. fid on a stand-in feature space)
            heading = describe(cfg, metric) if metric in registered else metric
            lines += [f"## {heading} vs NFE", "", *nfe_table(rows, metric), ""]
    head = ["method", "NFE", "distill top-p", "top-p", "temperature", *metrics]
    cells = [[r["label"], str(r.get("steps", "")), *(value_stderr(as_number(r.get(k)))
                                                      for k in ("distill_top_p", "top_p", "temperature")),
              *(value_stderr(as_number(r.get(m)), as_number(r.get(f"{m}_stderr"))) for m in metrics)]
             for r in rows]
    lines += ["## All rows (value ± standard error)", "", *markdown_table(head, cells)]
    lines += ["", "Numbers: `results.csv`. Pictures: " + ", ".join(f"`{p}`" for p in pictures) + ".", ""]
    (run_dir / "results.md").write_text("\n".join(lines), encoding="utf-8")


TRADEOFFS = (("entropy", "gen_ppl", "gen_ppl_vs_entropy.png"),   # (x, y, file): the Pareto view
             ("gen_ppl", "gradient_moment", "gm_vs_gen_ppl.png"))  # Fig. 3


def write_plots(run_dir: Path, rows: list[dict], metrics: list[str], titles: dict[str, str] | None = None) -> list[str]:
    """nfe_<metric>.png per metric with values (titled with `titles[metric]` where given, e.g.
    which feature space the `frechet` column is), and the trade-off scatters; returns file names."""
    written = []
    for metric in metrics:
        if any(as_number(r.get(metric)) is not None for r in rows):
            name = f"nfe_{metric}.png"
            plots.metric_vs_steps(rows, metric, run_dir / name, group="label", errorbars=True,
                                  title=(titles or {}).get(metric))
            written.append(name)
    present = {m for m in metrics if any(as_number(r.get(m)) is not None for r in rows)}
    for x, y, name in TRADEOFFS:
        if {x, y} <= present:
            plots.tradeoff(rows, x, y, run_dir / name, group="label")
            written.append(name)
    return written
