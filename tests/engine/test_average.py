"""The merge engine against the float64 reference: every method, dtype, format and layout."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import WIDE, check_against_reference, files_equal, load_dir, make_run, reference, weights_of
from merger.testing import synth
from merger.api import average
from merger.formats import read_checkpoint
from merger.plan.methods import Method
from merger.plan import Options
from merger.units import SIZES

CHUNK = SIZES.chunk  # the default sizes: this module never changes them

STEPS = (1000, 2000, 3000, 4000)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["uniform", "ema", "linear", "weights"])
def test_methods_and_dtypes(tmp_path, method, dtype):
    root, sds = make_run(tmp_path / "run", steps=STEPS, dtype=dtype)
    given = (1.0, 3.0, 0.5, 2.0)
    m = Method(method, decay=0.7 if method == "ema" else None, weights=given if method == "weights" else None)
    plan, res = average([str(root)], revisions="step1000..step4000", options=Options(method=m),
                        output=tmp_path / "out")
    w = weights_of(method, 4, decay=0.7, given=given)
    assert list(plan.weights) == pytest.approx(w, abs=1e-15)
    check_against_reference(tmp_path / "out", sds, w)


def test_uniform_average_is_correctly_rounded(tmp_path):
    """Equal weights: the float32 sum of float16 values is exact and divided once, so the output
    is the float64 reference rounded to float16, bit for bit (mergekit's result, too)."""
    root, sds = make_run(tmp_path / "run", shape=WIDE, steps=tuple(range(1, 10)))
    average([str(root)], output=tmp_path / "out")
    out, ref = load_dir(tmp_path / "out"), reference(sds, [1 / 9] * 9)
    for k, r in ref.items():
        if out[k].is_floating_point():
            assert torch.equal(out[k], r.to(torch.float16)), k


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("shard", [None, 150_000])
def test_formats_and_shards(tmp_path, fmt, shard):
    root, sds = make_run(tmp_path / "run", steps=STEPS, fmt=fmt, max_shard_size=shard)
    if shard:
        assert len(set(t.path for t in read_checkpoint(root / "step1000").values())) > 1
    average([str(root)], revisions="step1000..step4000", output=tmp_path / "out")
    check_against_reference(tmp_path / "out", sds, [0.25] * 4)


def test_each_input_with_its_own_shard_layout(tmp_path):
    """Revisions saved with different shard layouts and formats still line up tensor by tensor."""
    sds = [synth.pythia_state_dict("tiny", step=s) for s in STEPS]
    cfg = synth.SHAPES["tiny"].config()
    for s, sd, (fmt, shard) in zip(STEPS, sds, [("bin", None), ("safetensors", 100_000),
                                                ("bin", 60_000), ("safetensors", None)]):
        synth.save_checkpoint(tmp_path / "run" / f"step{s}", sd, fmt=fmt, max_shard_size=shard, config=cfg)
    average([str(tmp_path / "run")], revisions="step1000..step4000", output=tmp_path / "out")
    check_against_reference(tmp_path / "out", sds, [0.25] * 4)


def test_float64_accumulation_and_output_dtype(tmp_path):
    root, sds = make_run(tmp_path / "run", steps=STEPS, dtype=torch.float32)
    average([str(root)], revisions="..step4000", options=Options(accumulate="float64"), output=tmp_path / "a")
    # float64 accumulation of float32 inputs is correctly rounded (within half an ulp)
    check_against_reference(tmp_path / "a", sds, [0.25] * 4, ulps=0.5)
    average([str(root)], revisions="..step4000", options=Options(accumulate="float32"), output=tmp_path / "f")
    check_against_reference(tmp_path / "f", sds, [0.25] * 4, accumulate="float32")
    assert not files_equal(tmp_path / "a", tmp_path / "f")  # the option does change the arithmetic
    average([str(root)], revisions="..step4000", options=Options(dtype="bfloat16"), output=tmp_path / "b")
    check_against_reference(tmp_path / "b", sds, [0.25] * 4, out_dtype=torch.bfloat16)


def test_small_budget_splits_tensors_bit_identically(tmp_path):
    root, sds = make_run(tmp_path / "run", shape=WIDE, steps=STEPS, dtype=torch.float32)
    p_small, _ = average([str(root)], revisions="..step4000", output=tmp_path / "small",
                         options=Options(max_memory=CHUNK * (2 * 4 * 4 + 2 * 4)))
    p_big, _ = average([str(root)], revisions="..step4000", output=tmp_path / "big")
    embed = next(i for i, t in enumerate(p_small.tensors) if t.name == "gpt_neox.embed_in.weight")
    pieces = [s for b in p_small.blocks for s in b if s.tensor == embed]
    assert len(pieces) == 4 and all(s.start % CHUNK == 0 for s in pieces)  # cut into element ranges
    assert [s for b in p_big.blocks for s in b if s.tensor == embed] == [type(pieces[0])(embed, 0, 8192 * 128)]
    assert files_equal(tmp_path / "small", tmp_path / "big")
    check_against_reference(tmp_path / "small", sds, [0.25] * 4)
    # and a second run is bit-identical too
    average([str(root)], revisions="..step4000", output=tmp_path / "again",
            options=Options(max_memory=CHUNK * 40))
    assert files_equal(tmp_path / "small", tmp_path / "again")


def test_identical_chunks_and_buffers_are_copied(tmp_path):
    """A tensor equal in every input comes out bit for bit, even where averaging would round."""
    root, sds = make_run(tmp_path / "run", steps=(1, 2, 3), dtype=torch.float32)
    for s, sd in zip((1, 2, 3), sds):  # a frozen float32 tensor whose average would not round-trip
        sd["gpt_neox.final_layer_norm.bias"] = torch.full((64,), 0.1, dtype=torch.float32)
        synth.save_checkpoint(root / f"step{s}", sd, config=synth.SHAPES["tiny"].config())
    _, res = average([str(root)], options=Options(method=Method("weights", weights=(1, 1, 1))),
                     output=tmp_path / "out")
    out = load_dir(tmp_path / "out")
    assert torch.equal(out["gpt_neox.final_layer_norm.bias"], sds[0]["gpt_neox.final_layer_norm.bias"])
    assert "gpt_neox.final_layer_norm.bias" in res.copied_tensors
    assert "gpt_neox.layers.0.attention.masked_bias" in res.copied_tensors


def test_manifest_and_card(tmp_path, tiny_run):
    root, _ = tiny_run
    _, res = average([str(root)], revisions="step1000..step3000", output=tmp_path / "out", command=["merger", "x"],
                     options=Options(hash_inputs=True))
    m = json.loads((tmp_path / "out" / "merger.json").read_text())
    assert m["method"] == "uniform" and m["weights"] == pytest.approx([1 / 3] * 3)
    assert [s["name"] for s in m["sources"]] == ["step1000", "step2000", "step3000"]
    import hashlib

    for s in m["sources"]:
        for f in s["files"]:
            data = (root / s["name"] / f["file"]).read_bytes()
            assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["command"] == ["merger", "x"] and m["peak_rss"] > 0 and m["timings"]["total_s"] > 0
    average([str(root)], revisions="step1000..step3000", output=tmp_path / "nohash")  # default: no hashing
    m = json.loads((tmp_path / "nohash" / "merger.json").read_text())
    assert all(f["sha256"] is None and f["size"] > 0 and f["mtime_ns"] > 0 for s in m["sources"] for f in s["files"])
    assert (tmp_path / "out" / "config.json").read_bytes() == (root / "step3000" / "config.json").read_bytes()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "step2000" in card and "0.333333" in card


def test_duplicate_revisions_reported_and_strict(tmp_path):
    root, sds = make_run(tmp_path / "run", steps=(0, 1, 2))
    import shutil

    shutil.rmtree(root / "step1")
    shutil.copytree(root / "step0", root / "step1")  # Pythia: step0 == step1
    _, res = average([str(root)], output=tmp_path / "out")
    assert res.duplicates == [("step0", "step1")]
    from merger.errors import TensorError

    with pytest.raises(TensorError, match="identical weights: step0 == step1"):
        average([str(root)], output=tmp_path / "strict", options=Options(strict=True))
    assert not (tmp_path / "strict").exists()


@pytest.mark.slow  # Pythia-70m-sized inputs, loaded by transformers (~17 s)
def test_pythia_70m_architecture_merges_and_loads(tmp_path):
    """Real Pythia-70m shapes and buffers, pytorch_model.bin, fp16: buffers bit-exact, loads in
    transformers, and the logits equal those of a model built from the reference weights."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    steps = (100000, 105000, 110000)
    root, sds = make_run(tmp_path / "pythia", shape="70m", steps=steps, fmt="bin")
    _, res = average([str(root)], output=tmp_path / "out", options=Options(max_memory=256 * 2**20))
    check_against_reference(tmp_path / "out", sds, [1 / 3] * 3)
    for i in range(6):
        for buf in ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"):
            assert f"gpt_neox.layers.{i}.{buf}" in res.copied_tensors
    merged = load_dir(tmp_path / "out")
    assert merged["gpt_neox.layers.0.attention.bias"].dtype == torch.uint8
    assert merged["gpt_neox.layers.0.attention.bias"].shape == (1, 1, 2048, 2048)
    assert merged["gpt_neox.layers.3.attention.masked_bias"].item() == float("-inf")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    cfg = GPTNeoXConfig(**{k: v for k, v in synth.SHAPES["70m"].config().items() if k != "torch_dtype"})
    ref = GPTNeoXForCausalLM(cfg).eval()
    from helpers import reference

    r = reference(sds, [1 / 3] * 3)
    head = "lm_head.weight" if hasattr(ref, "lm_head") else "embed_out.weight"  # transformers 5 renamed it
    sd = {(head if k == "embed_out.weight" else k): v.to(torch.float16).float() if v.is_floating_point() else v
          for k, v in r.items()}
    missing, _ = ref.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "rotary" not in k]
    ids = torch.randint(0, 50304, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
