"""What the CPU kernels share: numba fast-math flags, a finite minus infinity, and the
weights of one row of scores (SAS or exact)."""

import math

import numpy as np
from numba import njit

NEG = -3.0e38  # a finite "minus infinity": no inf arithmetic under fastmath
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}  # no nnan/ninf: masks stay exact


@njit(fastmath=_FAST, inline="always")
def row_weights(s, r, lo, hi, top, use_sas, lut, c0, c1, c2, c3, lut_max):
    """``s[r, lo:hi]`` -> ``e^(s - top)`` in place, SAS (``e^x = LUT[n]·P(f)``, ``-x = n + f``;
    ``lut[T + 1] = 0`` cuts without a branch) or exact, and ``s[r, :lo]`` -> 0 (keys before a
    sliding window); returns (the weights' sum, SAS zeros)."""
    total = np.float32(0.0)
    zeros = 0
    for t in range(lo):
        s[r, t] = 0.0
    if use_sas:
        cut = np.float32(lut_max + 1.0)
        a0, a1, a2, a3 = np.float32(c0), np.float32(c1), np.float32(c2), np.float32(c3)
        for t in range(lo, hi):
            neg = min(top - s[r, t], cut)
            n = np.floor(neg)
            f = neg - n
            w = lut[np.int32(n)] * (((a3 * f + a2) * f + a1) * f + a0)
            s[r, t] = w
            total += w
            zeros += n > lut_max
    else:
        for t in range(lo, hi):
            w = np.float32(math.exp(s[r, t] - top))
            s[r, t] = w
            total += w
    return total, zeros
