"""Comparisons between rows of runs, as the results module docstring describes: the planned ones, else every pair of
two or three rows; the sentences never rank rows whose difference is not significant."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from imdb_grad_accum import stats
from imdb_grad_accum.errors import UserError

SIGNIFICANCE = 0.05
ALL_PAIRS_UP_TO = 3  # rows; with more, only planned comparisons are made (each costs the others power under Holm)


@dataclass
class Row:
    """Runs of one configuration that differ only in the seed; or, from imdb-evaluate, one run on other data."""

    runs: list
    correct: np.ndarray  # (seeds, reviews) 0/1, columns by review
    reviews: str | None  # what proves the reviews: the same value means the same texts and labels, in order
    labels: list[str] = field(default_factory=list)
    name: str = ""
    values: dict = field(default_factory=dict)  # what the table shows


@dataclass
class Comparison:
    a: Row
    b: Row
    difference: float  # accuracy of a minus b, as a fraction
    low: float
    high: float
    p: float  # exact McNemar, on per-review majority correctness
    p_holm: float = 1.0

    @property
    def significant(self) -> bool:
        return not self.low <= 0 <= self.high and self.p_holm < SIGNIFICANCE

    def sentence(self, comparisons: int) -> str:
        if self.difference < 0:  # the better row first: its lead and interval read as positive numbers
            return Comparison(self.b, self.a, -self.difference, -self.high, -self.low, self.p, self.p_holm).sentence(
                comparisons)
        numbers = (f"{100 * self.difference:+.1f} points, 95% interval {100 * self.low:+.1f} to "
                   f"{100 * self.high:+.1f}; McNemar p = {self.p:.3g}, {self.p_holm:.3g} after Holm's correction for "
                   f"{comparisons} comparison(s)")
        if self.low <= 0 <= self.high:
            return (f"**{self.a.name}** and **{self.b.name}**: not significantly different ({numbers}); the interval "
                    "covers 0, so these runs do not rank them.")
        if not self.significant:
            return (f"**{self.a.name}** and **{self.b.name}**: the interval excludes 0 but McNemar's test after "
                    f"correction does not ({numbers}); the difference is not established.")
        return f"**{self.a.name}** is more accurate than **{self.b.name}** ({numbers})."


def find_row(rows: list[Row], reference: str) -> Row:
    """The row a comparison names: by its name, or by a label it carries, with or without its folder."""
    reference = reference.strip()
    found = [row for row in rows
             if reference in (row.name, *row.labels, *(label.split("/")[-1] for label in row.labels))]
    if len(found) != 1:
        raise UserError(f"comparison: {'no' if not found else 'more than one'} row is named {reference!r}; the rows "
                        f"are: {'; '.join(row.name for row in rows)}")
    return found[0]


def planned_pairs(rows: list[Row], baseline: str | None, compare: list[str]) -> list[tuple[Row, Row]] | None:
    """The pairs to compare: every row against --baseline, the --compare "A vs B" pairs, or (None) every pair."""
    if baseline is not None:
        base = find_row(rows, baseline)
        return [(row, base) for row in rows if row is not base]
    pairs = []
    for item in compare:
        if " vs " not in item:
            raise UserError(f"--compare {item!r}: write the two rows as \"A vs B\"")
        a, b = (find_row(rows, side) for side in item.split(" vs ", 1))
        if a is b:
            raise UserError(f"--compare {item!r}: both sides are the row {a.name!r}")
        pairs.append((a, b))
    return pairs or None


def compare(rows: list[Row], pairs: list[tuple[Row, Row]] | None) -> tuple[list[Comparison], list[str]]:
    """The comparisons made, Holm-corrected together, and why any pair was not compared."""
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]] if len(rows) <= ALL_PAIRS_UP_TO else []
    made, skipped = [], []
    for a, b in pairs:
        if a.reviews is None or a.reviews != b.reviews:
            skipped.append(f"{a.name} vs {b.name}: " + ("their seeds were tested on different reviews"
                                                        if None in (a.reviews, b.reviews) else
                                                        "they were tested on different reviews (other data or split)"))
            continue
        difference, low, high = stats.paired_bootstrap_difference(a.correct, b.correct)
        p = stats.mcnemar_exact(stats.majority_correct(a.correct), stats.majority_correct(b.correct))
        made.append(Comparison(a, b, difference, low, high, p))
    for comparison, adjusted in zip(made, stats.holm_adjust([c.p for c in made])):
        comparison.p_holm = adjusted
    return made, skipped


def comparison_section(rows: list[Row], pairs: list[tuple[Row, Row]] | None) -> list[str]:
    """The README's comparisons: the planned pairs, or (None) every pair of up to ALL_PAIRS_UP_TO rows."""
    made, skipped = compare(rows, pairs)
    if not made and not skipped:
        if len(rows) <= ALL_PAIRS_UP_TO:
            return []
        return ["## Comparisons", "", f"None made: with {len(rows)} rows, name the comparisons the study was run for "
                "(`--baseline ROW`, `--compare \"A vs B\"` or `--comparisons FILE`); each one made costs the others "
                "power under Holm's correction.", ""]
    text = ["## Comparisons", "",
            f"{len(made)} comparison(s): {'every two rows' if pairs is None else 'those the study planned'}, each on "
            "the same test reviews. The interval is a paired bootstrap over test reviews (10,000 resamples; rows with "
            "several seeds also resample seeds). The test is an exact McNemar test on per-review correctness (a review "
            "counts as right for a row when most of its seeds got it right), with Holm's correction for the "
            "comparisons made. A difference is called significant only when the interval excludes 0 and the "
            f"corrected p is below {SIGNIFICANCE}.", ""]
    if made:
        text += ["| row A | row B | accuracy A − B (points) | paired bootstrap 95% interval | McNemar p | "
                 "Holm-adjusted p | significant |", "|---|---|---|---|---|---|---|"]
        text += [f"| {c.a.name} | {c.b.name} | {100 * c.difference:+.2f} | {100 * c.low:+.2f} to {100 * c.high:+.2f} "
                 f"| {c.p:.3g} | {c.p_holm:.3g} | {'yes' if c.significant else 'no'} |" for c in made]
        text += ["", "What these numbers support:", ""] + [f"- {c.sentence(len(made))}" for c in made]
    text += [""] + [f"- Not compared: {reason}." for reason in skipped] + ([""] if skipped else [])
    return text


def add_arguments(parser) -> None:
    """The comparisons a results table makes, as imdb-results and imdb-sweep take them."""
    group = parser.add_argument_group("comparisons in the results tables (give them one way)")
    group.add_argument("--baseline", metavar="ROW", help="compare every other row with this one only")
    group.add_argument("--compare", action="append", default=[], metavar='"A vs B"',
                       help="a comparison to make (repeatable)")
    group.add_argument("--comparisons", type=Path, metavar="FILE",
                       help="a study's planned comparisons (YAML: baseline: ROW, or compare: [\"A vs B\", ...])")


def chosen(args) -> tuple[str | None, list[str]]:
    """The baseline and the "A vs B" pairs asked for, given one way: --baseline, --compare or --comparisons (a YAML
    file with `baseline: ROW` or `compare: ["A vs B", ...]`)."""
    path, plan = args.comparisons, {}
    if path is not None:
        try:
            plan = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise UserError(f"--comparisons {path}: cannot read it ({type(err).__name__})") from None
        if not isinstance(plan, dict) or not set(plan) <= {"baseline", "compare"} or not (
                isinstance(plan.get("compare", []), list) and isinstance(plan.get("baseline", ""), str)):
            raise UserError(f"--comparisons {path}: expected `baseline: ROW` or `compare:` with a list of \"A vs B\"")
    baseline, pairs = plan.get("baseline"), [str(item) for item in plan.get("compare", [])]
    if sum(bool(x) for x in (args.baseline, args.compare, baseline or pairs)) > 1:
        raise UserError("give the comparisons one way: --baseline, --compare or --comparisons")
    return args.baseline or baseline, args.compare or pairs
