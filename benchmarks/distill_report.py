"""The tables, the goals of issue 17 and the README section of ``distillation.py``."""

from __future__ import annotations

from pathlib import Path

from readme_section import write_section

HEADING = "Distillation (`benchmarks/distillation.py`)"
INDEX_ROW = ("| `python benchmarks/distillation.py --readme` | few-step students (progressive, "
             "consistency, adversarial, reflow) against the teacher's best training-free "
             "sampler at 1-8 NFE: accuracy, FID, distillation CPU time | "
             "[Distillation](#distillation-benchmarksdistillationpy) |")
COLUMNS = ("method", "steps", "NFE", "sampler", "accuracy", "FID", "FID / teacher-50",
           "distill CPU-min", "/ teacher training")


def reference_fid(rows: list[dict]) -> float:
    """FID of the teacher with its default sampler at 50 NFE."""
    return next(r["fid"] for r in rows if r.get("reference"))


def cells(row: dict, ref: float) -> list[str]:
    cost = row.get("distill_cpu_s")
    return [row["method"] + (" (default sampler)" if row.get("reference") else ""),
            str(row["steps"]), str(row["nfe"]), row["sampler"], f"{row['accuracy']:.3f}",
            f"{row['fid']:.4f}", f"{row['fid'] / ref:.2f}",
            "-" if cost is None else f"{cost / 60:.1f}",
            "-" if cost is None else ratio_cell(row["cost_ratio"])]


def ratio_cell(ratio: float | None) -> str:
    return "?" if ratio is None else f"{ratio:.2f}"


def markdown(rows: list[dict], floor: dict) -> str:
    """The main table, then the FID floor of real digits."""
    ref = reference_fid(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r, ref)) + " |" for r in rows]
    lines.append(f"| real digits (train split, no model) | - | - | - | "
                 f"{floor['accuracy']:.3f} | {floor['fid']:.4f} | {floor['fid'] / ref:.2f} "
                 f"| - | - |")
    return "\n".join(lines)


def samplers_table(rows: list[dict]) -> str:
    """FID of every training-free sampler tried on the teacher, per NFE budget."""
    budgets = [r for r in rows if r["method"] == "teacher" and "tried" in r]
    names = sorted({t["sampler"] for r in budgets for t in r["tried"]})
    lines = ["| sampler | " + " | ".join(f"≤ {r['target_nfe']} NFE" for r in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for name in names:
        row = []
        for r in budgets:
            t = next((t for t in r["tried"] if t["sampler"] == name), None)
            row.append("-" if t is None else f"{t['fid']:.4f} ({t['steps']} st, {t['nfe']})")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def reach_line(rows: list[dict], floor: dict) -> str:
    """The FIDs the goals ask for, next to that of real digits at this sample size."""
    ref = reference_fid(rows)
    t4 = next(r for r in rows if r["method"] == "teacher" and r.get("target_nfe") == 4)
    need4 = min(1.05 * ref, t4["fid"] / 2)
    return (f"- the goals need a 1-step FID ≤ {1.5 * ref:.4f} and a 4-step FID ≤ {need4:.4f}; "
            f"real train digits score {floor['fid']:.4f} at this sample size"
            + (" (below the floor: the 4-step goal cannot be met on this FID)"
               if need4 < floor["fid"] else ""))


def goal_lines(rows: list[dict], teacher: dict, floor: dict) -> list[str]:
    """Issue 17's three goals on this table, each met or not with its numbers."""
    ref = reference_fid(rows)
    students = [r for r in rows if r["method"] != "teacher"]
    if not students:
        return ["- no distillation method was available (`DISTILL_METHODS` empty or missing):"
                " the three goals are not evaluated yet.", reach_line(rows, floor)]
    one = [r for r in students if r["target_nfe"] == 1]
    passing = [r for r in one if r["accuracy"] >= 0.95 and r["fid"] <= 1.5 * ref]
    b1, ok1 = min(passing or one, key=lambda r: r["fid"]), bool(passing)
    four = [r for r in students if r["target_nfe"] == 4]
    b4 = min(four, key=lambda r: r["fid"])
    t4 = next(r for r in rows if r["method"] == "teacher" and r.get("target_nfe") == 4)
    ok4 = b4["fid"] <= 1.05 * ref and t4["fid"] >= 2 * b4["fid"]
    costs = {r["method"]: r["cost_ratio"] for r in students}
    lines = [
        f"- best 1-step student ({b1['method']}): accuracy {b1['accuracy']:.3f} (goal ≥ 0.95),"
        f" FID {b1['fid']:.4f} = {b1['fid'] / ref:.2f}× the teacher's {ref:.4f} at 50 NFE "
        f"(goal ≤ 1.5×): {verdict(ok1)}",
        f"- best 4-step student ({b4['method']}): FID {b4['fid']:.4f} = {b4['fid'] / ref:.2f}×"
        f" the teacher's at 50 NFE (goal ≤ 1.05×), and the teacher's best training-free "
        f"sampler at 4 NFE ({t4['sampler']}, FID {t4['fid']:.4f}) is {t4['fid'] / b4['fid']:.2f}"
        f"× worse (goal ≥ 2×): {verdict(ok4)}"]
    lines.append(reach_line(rows, floor))
    if teacher["cpu_s"] is None:
        return lines + ["- distillation cost: the teacher's training time is unknown (a run "
                        "reused without its time record): not evaluated"]
    for method, ratio in costs.items():
        lines.append(f"- {method}: distillation {ratio:.2f}× the teacher's training CPU time "
                     f"({teacher['cpu_s'] / 60:.1f} CPU-min) (goal ≤ 3×): {verdict(ratio <= 3)}")
    return lines


def write_readme(path: Path, body: str) -> Path:
    """Replace (or add) this benchmark's README section and index row."""
    return write_section(path, HEADING, body, INDEX_ROW, "distillation.py")
