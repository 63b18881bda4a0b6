"""PNG plots of an ``ifp-eval`` result: quality vs keep per method, speed-up vs the ideal."""

from pathlib import Path
from typing import List

COLUMNS = {  # result key -> axis label
    "chat_loss": "chat answer loss (nats) ↓",
    "fidelity_kl": "KL(dense ‖ pruned) (nats) ↓",
    "fidelity_agree": "greedy agreement with dense ↑",
    "mmlu_acc": "MMLU accuracy ↑",
    "humaneval_pass1": "HumanEval pass@1 ↑",
    "text_ppl": "Shakespeare perplexity ↓",
}


def plot(result: dict, folder: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    rows = result["results"]
    methods = result["settings"]["methods"]
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    written = []
    if cols:
        n = len(cols)
        ncol = min(3, n)
        nrow = -(-n // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
        for ax, col in zip(axes.flat, cols):
            for m in methods:
                pts = sorted((r["keep"], r[col]) for r in rows if r["method"] == m and col in r)
                if m == "dense" and pts:
                    ax.axhline(pts[0][1], color="k", ls=":", lw=1, label="dense")
                elif pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xlabel("keep (fraction of FFN units)")
            ax.set_title(COLUMNS[col], fontsize=10)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.suptitle(f"{result.get('model', '')}: quality vs keep", fontsize=11)
        fig.tight_layout()
        written.append(folder / "quality.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    speed = result.get("speed")
    if speed and speed.get("rows"):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        pts = sorted((r["kept"], r["speedup"]) for r in speed["rows"])
        ideal = sorted((r["kept"], r["ideal_speedup"]) for r in speed["rows"])
        ax.plot(*zip(*([(1.0, 1.0)] + ideal)), "k--", label="ideal 1/(1 − f·(1 − keep))")
        ax.plot(*zip(*([(1.0, 1.0)] + pts)), marker="o", label="measured decode")
        ax.set_xlabel("keep (fraction of FFN units)")
        ax.set_ylabel("decode speed-up vs dense")
        ax.set_title(f"f = {speed['ffn_byte_share']:.3f}, {speed['device']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(folder / "speed.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
