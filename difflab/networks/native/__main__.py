"""``python -m difflab.networks.native``: build the native CPU kernels now and say where they
are, or why they are not used (for example on a cluster's login node before a run)."""

from __future__ import annotations

import sys
import warnings

from difflab.networks import native


def main() -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = native.library()
    if lib is None:
        reason = caught[-1].message if caught else "turned off by DIFFLAB_NATIVE=0"
        print(f"native CPU kernels: off ({reason})")
        return 1
    print(f"native CPU kernels: on ({native.library_path()})")
    for warning in caught:  # e.g. the cache folder was refused: say why
        print(f"note: {warning.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
