"""The figures of a run: the metrics of an accuracy matrix (average incremental and last accuracy,
forgetting, backward transfer), their mean and std over seeds, and the results table train.py prints.
Plain functions of results.json's fields; train.py re-exports every name."""
from __future__ import annotations

import torch


def metrics(R: list[list[float | None]], counts: list[list[int]]) -> dict:
    """R[t][j]: accuracy (%) after phase t on the test data of phase j (j <= t); counts: test sizes.
    A phase's accuracy is over all its seen classes' test rows (weighted by rows, not by classes).
    None where phase j had no rows to measure (a continued run's old classes without --eval-data):
    such an entry counts in no figure. Forgetting and BWT are None where no earlier phase was
    measured twice (one phase; a continued run without --eval-data): not measured, not zero."""
    T = len(R)
    acc = [sum(r * n for r, n in zip(R[t], counts[t]) if r is not None) / sum(counts[t]) for t in range(T)]
    forg = [max(R[t][j] for t in range(j, T - 1) if R[t][j] is not None) - R[T - 1][j] for j in range(T - 1)
            if R[T - 1][j] is not None and any(R[t][j] is not None for t in range(j, T - 1))]
    bwt = [R[T - 1][j] - R[j][j] for j in range(T - 1) if R[T - 1][j] is not None and R[j][j] is not None]
    return {"phase_accuracy": acc, "avg_incremental_accuracy": sum(acc) / T, "last_accuracy": acc[-1],
            "avg_forgetting": sum(forg) / len(forg) if forg else None, "bwt": sum(bwt) / len(bwt) if bwt else None}


def summarize(results: list[dict]) -> list[dict]:
    """Runs grouped by method (in order): mean and sample std (n - 1) of each headline figure over
    seeds, over the runs that measured it (None where none did; std None for a single run)."""
    keys = ("avg_incremental_accuracy", "last_accuracy", "avg_forgetting", "bwt")
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in groups.items():
        row = {"method": method, "runs": len(rs), "exemplars_per_class": sum(r["memory"]["exemplars_per_class"] for r in rs) / len(rs),
               "bytes_used": max(r["memory"]["bytes_used"] for r in rs), "trainable_params": rs[0]["trainable_params"],
               "seconds": sum(sum(r["phase_seconds"]) for r in rs) / len(rs)}
        for k in keys:
            v = torch.tensor([r[k] for r in rs if r[k] is not None], dtype=torch.float64)
            row[k] = v.mean().item() if len(v) else None
            row[k + "_std"] = v.std().item() if len(v) > 1 else None
        out.append(row)
    return out


def show(results: list[dict], con) -> None:
    """The results table on the console con: one row per method, mean ± std where it has several seeds
    (a single run's figure alone), "–" where a figure was not measured."""
    from rich.table import Table
    rows = summarize(results)

    def pm(r, k):
        return ("–" if r[k] is None else f"{r[k]:.2f}" if r[k + "_std"] is None else
                f"{r[k]:.2f} ± {r[k + '_std']:.2f}")
    tab = Table(title="exmask results (accuracy in %" + (", mean ± std over seeds)" if any(r["runs"] > 1 for r in rows) else ")"))
    for col in ("method", "avg inc. acc", "last acc", "forgetting", "BWT", "exemplars/class", "bytes used", "trainable", "s/run"):
        tab.add_column(col, justify="right")
    for r in rows:
        tab.add_row(r["method"], pm(r, "avg_incremental_accuracy"), pm(r, "last_accuracy"), pm(r, "avg_forgetting"),
                    pm(r, "bwt"), f"{r['exemplars_per_class']:.1f}", f"{r['bytes_used']:,}", f"{r['trainable_params']:,}",
                    f"{r['seconds']:.0f}")
    con.print(tab)
