"""The exploratory investigation behind the default (README, "What drives the prompt's effect"),
tested with the one rule every figure uses: its per-seed headline accuracies
(``docs/data/exploratory_seeds.csv``, seeds 7, 9, 17, data_seed 0) compared pairwise by seed,
Holm over the 15 comparisons the investigation made.

    python -m analysis.exploratory        # the README's table of differences

These runs chose the default, so their gaps are biased upward; the pre-registered confirmation
(``python sweeps/confirm_prompt.py``) is the test of the headline claims.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from vpns_core.stats import Comparison, paired

DATA = Path(__file__).resolve().parents[1] / "docs" / "data" / "exploratory_seeds.csv"
DEFAULT = ("authors", "VPNs, reference loop, prompt over a 64 px image (the default)")
HYDRA_2X = ("authors", "HYDRA, reference loop, 64 px, 4 + 4 epochs")
#: (what it asks, arm, control): the investigation's comparisons, in the README's order
COMPARISONS = [
    ("paper schedule, prompt on the frame of a 32 px image: VPNs − HYDRA",
     ("inert", "VPNs"), ("inert", "HYDRA")),
    ("paper schedule, prompt over a 64 px image: VPNs − HYDRA",
     ("geometry", "VPNs, prompt over a 64 px image"), ("geometry", "HYDRA, 64 px image")),
    ("reference loop, frame layout: VPNs − HYDRA (as many updates)",
     ("protocol", "VPNs, reference loop"), ("protocol", "HYDRA, reference loop, 4 + 4 epochs")),
    ("paper schedule, prompt over a 32 px image: VPNs − HYDRA",
     ("small", "VPNs, prompt (4 px) over a 32 px image"), ("small", "HYDRA, 32 px image")),
    ("4x the steps at 1/4 of the mask lr: VPNs − HYDRA",
     ("small", "VPNs, 32 px, 8 + 8 epochs, mask lr 2.5e-3"), ("small", "HYDRA, 32 px, 8 + 8 epochs, mask lr 2.5e-3")),
    ("the default: VPNs − HYDRA with as many updates", DEFAULT, HYDRA_2X),
    ("the default: learned pad − pad frozen at zero (same steps)", DEFAULT,
     ("checks", "VPNs as the default, prompt lr 1e-30 (an extra unaugmented step only)")),
    ("reference loop, prompt over a 32 px image: VPNs − HYDRA (as many updates)",
     ("checks", "VPNs, reference loop, prompt (4 px) over a 32 px image"),
     ("checks", "HYDRA, reference loop, 32 px, 4 + 4 epochs")),
    ("99% sparsity: VPNs − HYDRA (as many updates)",
     ("sparsity", "VPNs as the default at 99%"), ("sparsity", "HYDRA, reference, 64 px, 4 + 4 epochs, 99%")),
    ("the authors' mask lr 1e-4: VPNs − HYDRA (as many updates)",
     ("lr", "VPNs as the default, mask lr 1e-4 (the authors')"),
     ("lr", "HYDRA, reference, 64 px, 4 + 4 epochs, mask lr 1e-4")),
    ("prompt type: pad − fix", DEFAULT,
     ("claims", "VPNs as the default, fix prompt (42 px square, as many values as the pad)")),
    ("prompt type: pad − random", DEFAULT, ("claims", "VPNs as the default, random-position prompt (same count)")),
    ("VP stages: both − mask finding only", DEFAULT, ("claims", "VPNs as the default, prompt in mask finding only")),
    ("VP stages: both − weight tuning only", DEFAULT, ("claims", "VPNs as the default, prompt in weight tuning only")),
    ("64 px against 32 px, both filling the frame (not the paper's input-size design)", DEFAULT,
     ("checks", "VPNs, reference loop, prompt (4 px) over a 32 px image")),
]


def load(path: Path = DATA) -> dict[tuple[str, str], dict[int, float]]:
    values: dict[tuple[str, str], dict[int, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values.setdefault((row["phase"], row["setting"]), {})[int(row["seed"])] = float(row["headline_pct"])
    return values


def results(path: Path = DATA) -> list[tuple[str, Comparison]]:
    """Each comparison with its Holm-corrected (over all 15) paired test."""
    tests = paired(load(path), [(arm, control) for _, arm, control in COMPARISONS])
    return [(what, test) for (what, _, _), test in zip(COMPARISONS, tests)]


def table(path: Path = DATA) -> str:
    lines = ["| comparison (exploratory, seeds 7, 9, 17) | difference, points | family-wise 95% CI | p (Holm) | verdict |",
             "|---|---|---|---|---|"]
    for what, c in results(path):
        lines.append(f"| {what} | {c.diff:+.1f} | [{c.low:+.1f}, {c.high:+.1f}] | {c.p_holm:.2g} | {c.verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
