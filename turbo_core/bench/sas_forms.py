"""``turbo bench sas``: the SAS exponent's forms side by side — the single polynomial, pieces
on [0, 1) and finer LUTs — with their max relative error (the math in float64, and as
evaluated in float32 over the kept range) and what they cost per weight (operations, FMAs,
table and coefficient floats). No timing: the costs are counted, the errors measured."""

from __future__ import annotations

import torch
from tabulate import tabulate

from turbo_core.attention import sas
from turbo_core.attention.config import SASConfig

# (pieces, lut_steps) per row, for each degree
FORMS = ((1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (1, 4), (1, 8), (1, 16), (4, 4))


def run(degrees: tuple[int, ...] = (2, 3), lut_max: int = 8) -> dict:
    rows = []
    single = {d: sas.poly_max_rel_error(SASConfig(degree=d, lut_max=lut_max)) for d in degrees}
    for degree in degrees:
        for pieces, steps in FORMS:
            cfg = SASConfig(degree=degree, lut_max=lut_max, pieces=pieces, lut_steps=steps)
            err = sas.poly_max_rel_error(cfg)
            rows.append({"degree": degree, "pieces": pieces, "lut_steps": steps,
                         "max_rel_error": err,
                         "max_rel_error_float32": sas.measured_max_rel_error(cfg, torch.float32),
                         "vs_single": single[degree] / err,
                         "kernels": cfg.kernel_blocker() is None, **sas.op_count(cfg)})
    return {"benchmark": "sas-forms", "lut_max": lut_max, "results": rows}


def table(doc: dict, fmt: str = "simple") -> str:
    body = [[r["degree"], r["pieces"], r["lut_steps"], f"{r['max_rel_error']:.2e}",
             f"{r['max_rel_error_float32']:.2e}", f"{r['vs_single']:.0f}x", r["ops_per_weight"],
             r["fma"], r["table_floats"], r["coefficient_floats"], "yes" if r["kernels"] else "no"]
            for r in doc["results"]]
    head = (f"SAS exponent forms (T = {doc['lut_max']}): error of LUT x polynomial against exp, "
            f"and operations per weight")
    return head + "\n\n" + tabulate(
        body, headers=["degree", "pieces", "LUT steps", "max rel err", "in float32",
                       "better than 1 piece", "ops/weight", "FMA", "LUT floats", "coeff floats",
                       "fused kernels"], tablefmt=fmt, disable_numparse=True)
