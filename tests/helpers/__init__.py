"""Shared test helpers, imported by name (``from helpers import make_run``); ``conftest.py`` holds
only fixtures and the session's environment.

- ``reference``: the float64 reference and its tolerances (``check_against_reference``,
  ``assert_close_ulp``, ``ulp``, ``reference``, ``load_dir``, ``acc_dtype``, ``weights_of``);
- ``runs``: seeded trajectories written by the real writers (``make_run``, ``WIDE``, ``files_equal``);
- ``checks``: the refusal contract (``check_refused``, ``leftovers``, ``tree_digest``, ``Interrupt``);
- ``trajectory``: ``Trajectory``, a tiny run plus the CLI call that must refuse it;
- ``crafted``: torch zip files built byte by byte; ``fakehub``: a loopback fake Hub;
- ``evalfixtures`` / ``sweepfixtures``: tiny trained models and trajectories for eval and sweep.

The torchrun fixture scripts stay beside the tests they serve (``tests/dcp_train.py``,
``tests/dcp_layouts.py``): they are run by path.
"""

from helpers.reference import (EPS, MANTISSA, acc_dtype, assert_close_ulp, check_against_reference, load_dir,
                               reference, ulp, weights_of)
from helpers.runs import WIDE, files_equal, make_run

__all__ = ["EPS", "MANTISSA", "WIDE", "acc_dtype", "assert_close_ulp", "check_against_reference", "files_equal",
           "load_dir", "make_run", "reference", "ulp", "weights_of"]
