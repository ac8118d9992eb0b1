"""The plan: everything about a merge that file headers can tell, fixed before a tensor is read.

``options.py`` (what was asked: :class:`Options`), ``methods.py`` (weight vectors), ``plan.py``
(the frozen :class:`Plan`), ``blocks.py`` (the *blocks* schedule's grouping), ``build.py`` (headers
-> plan, every mismatch reported at once).

**Add a method**: a branch in :func:`methods.weights_for` that returns one float64 weight per
checkpoint (oldest first), its name in ``methods.METHODS`` and its parameters on :class:`Method`;
the kernels only ever compute ``sum_i w_i x_i``, so nothing else changes. Tests in
``tests/plan/test_methods.py`` against closed forms, and one merge against the float64 reference.
"""

from merger.plan.build import build, check_layouts
from merger.plan.methods import METHODS, Method, parse_weights, weights_for
from merger.plan.options import FLOAT_DTYPES, Options, default_max_memory
from merger.plan.plan import Plan, ShardPlan, Slice, TensorPlan, block_cost, output_dtypes, slice_cost

__all__ = ["FLOAT_DTYPES", "METHODS", "Method", "Options", "Plan", "ShardPlan", "Slice", "TensorPlan",
           "block_cost", "build", "check_layouts", "default_max_memory", "output_dtypes", "parse_weights",
           "slice_cost", "weights_for"]
