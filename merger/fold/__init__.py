"""The fold: ``out = sum_i w_i x_i`` over one slice of one tensor, with the tensor rules.

``rules.py`` says what every kernel agrees on (:class:`FoldRule`: weights -> per-element
operations; the accumulation dtype; the errors). ``torch_kernel.py`` is the definition (CPU
chunks, CUDA, and the stream schedule's per-revision steps, all through ``Kernel.add_input``);
``native.py`` + ``_fold.c`` is the CPU default, bit-identical to it.

**Add a kernel**: a class with the :class:`~merger.fold.torch_kernel.Kernel` state (``copied``,
``same_as_prev``, :meth:`duplicates`) whose fold takes a slice of a
:class:`~merger.plan.TensorPlan` (its inputs' byte extents) and raises the ``rules.py`` errors;
a pipeline in ``engine/`` that feeds it; and a test in ``tests/fold/`` that it gives the torch
kernel's bits for every dtype pair and weighting.
"""
