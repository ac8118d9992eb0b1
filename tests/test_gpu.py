"""The CUDA path: same plan, pinned buffers, fold on the GPU. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from helpers import WIDE, check_against_reference, files_equal, make_run
from merger.api import average
from merger.plan import Options
from merger.units import SIZES

CHUNK = SIZES.chunk  # the default sizes: this module never changes them

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_reference_and_cpu(tmp_path, dtype):
    root, sds = make_run(tmp_path / "run", shape=WIDE, steps=(1, 2, 3, 4, 5), dtype=dtype)
    w = [0.1, 0.2, 0.3, 0.15, 0.25]
    from merger.plan.methods import Method

    opts = dict(method=Method("weights", weights=tuple(w)), max_memory=CHUNK * 60)
    average([str(root)], options=Options(device="cuda", **opts), output=tmp_path / "gpu")
    check_against_reference(tmp_path / "gpu", sds, w)
    average([str(root)], options=Options(device="cpu", **opts), output=tmp_path / "cpu")
    assert files_equal(tmp_path / "gpu", tmp_path / "cpu"), "CUDA and CPU folds differ in some bits"


def test_cuda_nan_is_reported(tmp_path):
    root, sds = make_run(tmp_path / "run", shape="tiny", steps=(1, 2, 3))
    from merger.testing import synth
    from merger.errors import TensorError

    sds[1]["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"][3, 5] = float("nan")
    synth.save_checkpoint(root / "step2", sds[1], config=synth.SHAPES["tiny"].config())
    with pytest.raises(TensorError, match="NaN or Inf in step2"):
        average([str(root)], options=Options(device="cuda"), output=tmp_path / "o")
    assert not (tmp_path / "o").exists()
