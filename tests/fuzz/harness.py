"""Run generated scans through the colorize stages in one process; count what escapes.

The stages are called as the Ray pipeline calls them (``prepare_one`` then ``finalize_one``,
with a real local output folder); no Ray, no model: ab is random, since what is under test
is that every input ends as exactly one row and that ok rows have the source's upright size.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.stages import StageOptions, finalize_one, prepare_one
from tests.fuzz.generators import Case

MODEL_SIZE = 64  # the model input size the stages resize to; small keeps the run quick


@dataclass
class Outcome:
    case: Case
    status: str  # ok | failed | escaped | wrong-size | wrong-error
    detail: str = ""  # error type, escaped exception, or the size disagreement
    seconds: float = 0.0


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def by_kind(self) -> dict[str, Counter[str]]:
        table: dict[str, Counter[str]] = defaultdict(Counter)
        for outcome in self.outcomes:
            table[outcome.case.kind][outcome.status] += 1
        return dict(table)

    @property
    def problems(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status not in ("ok", "failed")]

    def text(self) -> str:
        lines = [f"{'kind':<10} {'cases':>6} {'ok':>6} {'failed':>7} {'problems':>9}"]
        for kind, counts in sorted(self.by_kind().items()):
            bad = sum(n for status, n in counts.items() if status not in ("ok", "failed"))
            lines.append(
                f"{kind:<10} {sum(counts.values()):>6} {counts['ok']:>6} {counts['failed']:>7} "
                f"{bad:>9}"
            )
        total = len(self.outcomes)
        lines.append(f"{'all':<10} {total:>6}   problems: {len(self.problems)}")
        kinds = Counter(o.status for o in self.problems)
        lines.append("problems by kind: " + (", ".join(
            f"{status} {count}" for status, count in kinds.most_common()) or "none"))  # fmt: skip
        errors = Counter(o.detail for o in self.outcomes if o.status == "failed")
        lines.append("failed rows by error type: " + ", ".join(
            f"{name} {count}" for name, count in errors.most_common()))  # fmt: skip
        slowest = sorted(self.outcomes, key=lambda o: -o.seconds)[:3]
        lines.append("slowest: " + ", ".join(f"{o.case.name} {o.seconds:.2f} s" for o in slowest))
        for problem in self.problems[:40]:
            lines.append(f"  {problem.status}: {problem.case.kind}/{problem.case.name}: "
                         f"{problem.detail}")  # fmt: skip
        return "\n".join(lines)


def _options(folder: Path) -> StageOptions:
    return StageOptions(
        run_id="fuzz",
        dst=str(folder / "dst"),
        model_url="unused",
        model_id="fuzz@000000000000",
        model_sha256="0" * 64,
        image_size=MODEL_SIZE,
        software="chromascan fuzz",
    )


def run_case(case: Case, folder: Path, options: StageOptions, index: int) -> Outcome:
    """One case through both per-scan stages; any exception out of them is an escape."""
    source = folder / "src" / f"case-{index}"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(case.data)
    row = {
        "source_uri": str(source),
        "source_size": len(case.data),
        "relative_path": source.name,
        "output_path": f"case-{index}.png",
    }
    started = time.perf_counter()
    stage = "prepare"
    try:
        prepared = {**row, **prepare_one(row, options)}
        stage = "finalize"
        ab = np.random.default_rng(index).normal(0, 20, (2, MODEL_SIZE, MODEL_SIZE))
        final = {**prepared, **finalize_one(prepared, ab.astype(np.float32), options)}
    except Exception as err:
        last = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{Path(last.filename).name}:{last.lineno}"
        return Outcome(case, "escaped", f"{stage}: {type(err).__name__}: {err} ({where})"[:300],
                       time.perf_counter() - started)  # fmt: skip
    finally:
        source.unlink()
    seconds = time.perf_counter() - started
    if final["status"] != "ok":
        if case.error_type and final["error_type"] != case.error_type:
            return Outcome(case, "wrong-error", f"{final['error_type']} (expected "
                           f"{case.error_type}): {final['error_message']}", seconds)  # fmt: skip
        if case.size is not None and not case.error_type:
            # A picture whose size the generator knows is a valid one: refusing it is wrong.
            return Outcome(case, "refused", f"{final['error_type']}: {final['error_message']}",
                           seconds)  # fmt: skip
        return Outcome(case, "failed", str(final["error_type"]), seconds)
    output = (final["output_width"], final["output_height"])
    listed = (final["source_width"], final["source_height"])
    if output != listed or (case.size is not None and output != case.size):
        return Outcome(case, "wrong-size", f"output {output}, row says {listed}, upright "
                       f"source is {case.size}", seconds)  # fmt: skip
    if case.error_type:
        return Outcome(case, "wrong-error", f"ok (expected {case.error_type})", seconds)
    Path(str(final["output_uri"])).unlink(missing_ok=True)  # keep the folder small
    return Outcome(case, "ok", "", seconds)


def run(cases: Iterable[Case], folder: Path) -> Report:
    options = _options(folder)
    report = Report()
    for index, case in enumerate(cases):
        report.outcomes.append(run_case(case, folder, options, index))
    return report
