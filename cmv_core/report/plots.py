"""The report's plots as PNG bytes by file name, so the caller decides where they go.

matplotlib is imported inside functions (stage images that only import the module must not need it).
"""

from __future__ import annotations

from cmv_core.report.units import LIKERT


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def render_plots(report: dict) -> dict[str, bytes]:
    """PNG bytes by file name: score histograms per criterion, and pairwise outcome bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    single = report["single"]
    if single["variants"]:
        crits = single["criteria"]
        fig, axes = plt.subplots(1, len(crits), figsize=(4 * len(crits), 3.2), squeeze=False)
        variants = list(single["variants"])
        width = 0.8 / len(variants)
        for ax, crit in zip(axes[0], crits):
            for i, variant in enumerate(variants):
                hist = single["variants"][variant]["criteria"][crit]["histogram"]
                xs = [k + (i - (len(variants) - 1) / 2) * width for k in LIKERT]
                ax.bar(xs, [hist[str(k)] for k in LIKERT], width=width, label=variant)
            ax.set_title(crit)
            ax.set_xticks(list(LIKERT))
            ax.set_xlabel("score")
        axes[0][0].set_ylabel("replies")
        axes[0][-1].legend(fontsize="small")
        fig.tight_layout()
        plots["scores_histogram.png"] = _png(fig)
    if report["pairwise"]:
        comps = list(report["pairwise"].values())
        fig, ax = plt.subplots(figsize=(6, 1 + 0.6 * len(comps)))
        left = [0.0] * len(comps)
        labels = [f"{p['a']} vs {p['b']}" for p in comps]
        for key, colour in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
            vals = [p[key]["rate"] or 0.0 for p in comps]
            ax.barh(labels, vals, left=left, color=colour, label=key)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of pairs")
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        plots["pairwise.png"] = _png(fig)
    return plots
