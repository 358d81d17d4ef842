"""The human-readable report: a Markdown table and a chart comparing the students."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown_table(metrics: dict[str, Any]) -> str:
    teacher = metrics["teacher"]
    lines = [
        "| model | params | kd_weight | T | steps | val perplexity | val CE | KL(teacher‖student) | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| teacher | {teacher['params']:,} | – | – | – | {teacher['perplexity']:.2f} | {teacher['cross_entropy']:.4f} | – | – |",
    ]
    for name, m in sorted(metrics["students"].items(), key=lambda kv: (kv[1]["params"], kv[1]["kd_weight"])):
        lines.append(
            f"| {name} | {m['params']:,} | {m['kd_weight']:g} | {m['temperature']:g} | {m['steps']} | {m['perplexity']:.2f} "
            f"| {m['cross_entropy']:.4f} | {m['kl_to_teacher']:.4f} | {m['top1_agreement']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def comparison_chart(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = sorted(metrics["students"].items(), key=lambda kv: (kv[1]["params"], kv[1]["kd_weight"]))
    names = [name for name, _ in students]
    colors = ["tab:blue" if m["kd_weight"] > 0 else "tab:gray" for _, m in students]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [m["perplexity"] for _, m in students], color=colors)
    axes[0].axhline(metrics["teacher"]["perplexity"], color="tab:red", linestyle="--", label="teacher")
    axes[0].set_ylabel("validation perplexity (lower is better)")
    axes[0].legend()
    axes[1].bar(names, [m["kl_to_teacher"] for _, m in students], color=colors)
    axes[1].set_ylabel("KL(teacher ‖ student), nats/token")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Students on held-out plays (blue: distilled from the cache, gray: hard labels only)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_chart(logs: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Each student's held-out check over its training (validation CE and KL to the teacher's cached
    targets); students trained without one show their training CE instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in sorted(logs.items()):
        held_out = [r for r in rows if "val_ce" in r]
        if held_out:
            axes[0].plot([r["step"] for r in held_out], [r["val_ce"] for r in held_out], marker=".", label=name)
            axes[1].plot([r["step"] for r in held_out], [r["val_kd"] for r in held_out], marker=".", label=name)
        else:
            axes[0].plot([r["step"] for r in rows], [r["ce"] for r in rows], linestyle=":", label=f"{name} (train)")
    axes[0].set_ylabel("validation cross-entropy, nats/token")
    axes[1].set_ylabel("validation KL to the cached teacher targets")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:  # a panel with no curve (no held-out check) has no legend
            ax.legend(fontsize=8)
    fig.suptitle("Students while training: held-out check every eval_every steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
