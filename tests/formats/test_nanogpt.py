"""nanoGPT / LAWA ``ckpt_<step>.pt`` runs and other ``torch.save`` training checkpoints, in and out.

Checkpoints are written by a nanoGPT-style training loop (``merger.testing.nanogpt``: nanoGPT's
module names, tied head, AdamW state, ``best_val_loss`` as a tensor, a config dict; compiled
and plain), read by the real CLI, and compared with an in-memory float64 reference (<= 1 ulp).
Outputs are loaded with ``torch.load(weights_only=True)``, nanoGPT's own resume code and
transformers.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import assert_close_ulp, reference
from merger.cli import app
from merger.testing.nanogpt import GPT, GPTConfig, load_nanogpt, nanogpt_run
from helpers.checks import check_refused, leftovers, tree_digest

runner = CliRunner()
ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257, bias=True, dropout=0.0)
STEPS = (100, 200, 300, 400, 500)


def train_run(folder: Path, *, compiled: bool = False, seed: int = 0, name="ckpt_{step}.pt") -> Path:
    return nanogpt_run(folder, ARGS, steps=STEPS, compiled=compiled, seed=seed, name=name)


def models(paths) -> list[OrderedDict]:
    return [torch.load(p, weights_only=True)["model"] for p in paths]


def average(args: list[str]) -> dict:
    r = runner.invoke(app, ["average", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def check_average(out_sd: dict, ins: list[dict], names=None) -> None:
    """Every tensor within 1 ulp of the float64 mean; same keys (in order) and dtypes."""
    assert list(out_sd) == list(ins[-1])
    ref = reference([{k: v for k, v in sd.items()} for sd in ins], [1 / len(ins)] * len(ins))
    for k, v in out_sd.items():
        assert v.dtype == ins[-1][k].dtype, k
        assert_close_ulp(v, ref[k], name=k)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("plain") / "out")


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("compiled") / "out", compiled=True, seed=1)


@pytest.mark.parametrize("kind", ["plain", "compiled"])
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_average_matches_fp64_and_resumes_in_nanogpt(kind, kernel, plain_run, compiled_run, tmp_path):
    run = plain_run if kind == "plain" else compiled_run
    before = tree_digest(run)
    out = tmp_path / "avg"
    extra = ["--hash"] if kernel == "torch" else []  # --hash takes the torch pipeline
    res = average([str(run), "--revisions", "200..400", "-o", str(out), *extra])
    assert res["result"]["kernel"] == kernel
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "ckpt.pt", "merger.json"]
    files = [run / f"ckpt_{s}.pt" for s in (200, 300, 400)]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    latest = torch.load(files[-1], weights_only=True)
    assert list(ckpt) == ["model", "model_args", "iter_num", "config"]  # no optimizer, no best_val_loss
    assert ckpt["model_args"] == ARGS and ckpt["iter_num"] == 400 and ckpt["config"] == latest["config"]
    check_average(ckpt["model"], models(files))
    prefix = "_orig_mod." if kind == "compiled" else ""
    sd = ckpt["model"]
    assert sd[f"{prefix}lm_head.weight"].data_ptr() == sd[f"{prefix}transformer.wte.weight"].data_ptr()
    model = load_nanogpt(out / "ckpt.pt")  # nanoGPT's own resume: GPTConfig(**model_args), prefix strip
    assert model.lm_head.weight is model.transformer.wte.weight
    assert tree_digest(run) == before


def test_tied_weight_read_once_and_optimizer_never_read(plain_run, tmp_path):
    files = [plain_run / f"ckpt_{s}.pt" for s in STEPS]
    sd = models(files[:1])[0]
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in sd.values()}
    model_bytes = sum(unique.values())
    res = average([str(plain_run), "-o", str(tmp_path / "avg")])
    assert res["plan"]["tensors"] == len(sd) - 1  # lm_head.weight is transformer.wte.weight
    manifest = json.loads((tmp_path / "avg" / "merger.json").read_text())
    assert manifest["read_bytes"] == res["result"]["read_bytes"] == len(STEPS) * model_bytes
    assert sum(p.stat().st_size for p in files) > 3 * manifest["read_bytes"]  # AdamW: 2x the model
    assert [s["name"] for s in manifest["sources"]] == [f"ckpt_{s}" for s in STEPS]
    assert manifest["sources"][0]["files"][0]["file"] == "ckpt_100.pt"


def test_optimizer_truncated_still_merges(plain_run, tmp_path):
    files = [plain_run / f"ckpt_{s}.pt" for s in (400, 500)]
    run = tmp_path / "run"
    run.mkdir()
    for f in files:
        (run / f.name).write_bytes(f.read_bytes())
    cut = run / "ckpt_500.pt"
    data = cut.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.8)])  # inside exp_avg_sq: the model storages come first
    average([str(run), "-o", str(tmp_path / "avg")])
    check_average(torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=True)["model"], models(files))


def test_explicit_files_revision_names_and_every(plain_run, tmp_path):
    res = average([str(plain_run / "ckpt_500.pt"), str(plain_run / "ckpt_100.pt"), "-o", str(tmp_path / "a")])
    assert [s["step"] for s in res["plan"]["inputs"]] == [100, 500]
    res = average([str(plain_run), "-r", "ckpt_100..ckpt_500", "--every", "200", "-o", str(tmp_path / "b")])
    assert [s["name"] for s in res["plan"]["inputs"]] == ["ckpt_100", "ckpt_300", "ckpt_500"]


def test_nanogpt_out_folders_by_iter_num(plain_run, tmp_path):
    for i, s in enumerate((300, 100, 200)):  # folder names carry no step: iter_num inside does
        (tmp_path / "runs" / f"out-{'abc'[i]}").mkdir(parents=True)
        (tmp_path / "runs" / f"out-{'abc'[i]}" / "ckpt.pt").write_bytes((plain_run / f"ckpt_{s}.pt").read_bytes())
    res = average([str(tmp_path / "runs"), "-r", "100..200", "-o", str(tmp_path / "avg")])
    assert [(s["name"], s["step"]) for s in res["plan"]["inputs"]] == [("out-b", 100), ("out-c", 200)]
    check_average(torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=True)["model"],
                  models([plain_run / "ckpt_100.pt", plain_run / "ckpt_200.pt"]))


def test_key_override_and_ddp_prefix(plain_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sds = []
    for s in (100, 200):
        sd = torch.load(plain_run / f"ckpt_{s}.pt", weights_only=True)["model"]
        ddp = OrderedDict((f"module.{k}", v) for k, v in sd.items())
        ema = OrderedDict((f"module.{k}", v * 0.5) for k, v in sd.items())
        torch.save({"model": ddp, "ema": {"shadow": ema}, "step": s}, run / f"iter_{s}.pt")
        sds.append(ema)
    average([str(run), "--key", "ema.shadow", "-o", str(tmp_path / "avg")])
    out = torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=True)
    assert list(out) == ["ema", "step"] and out["step"] == 200
    check_average(out["ema"]["shadow"], sds)
    r = runner.invoke(app, ["average", str(run), "--key", "ema.nope", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "--key ema.nope" in r.stderr and "hint:" in r.stderr


def test_nanochat_flat_state_dicts_with_meta(plain_run, tmp_path):
    run = tmp_path / "chat"
    run.mkdir()
    sds = []
    for s in (100, 200, 300):
        sd = torch.load(plain_run / f"ckpt_{s}.pt", weights_only=True)["model"]
        torch.save(sd, run / f"model_{s:06d}.pt")  # nanochat: the state dict alone
        (run / f"meta_{s:06d}.json").write_text(json.dumps({"step": s, "model_config": ARGS}))
        sds.append(sd)
    torch.save({"state": {}}, run / "optim_000300_rank0.pt")  # no step in its name: not a revision
    res = average([str(run), "-r", "100..300", "-o", str(tmp_path / "avg")])
    assert [s["name"] for s in res["plan"]["inputs"]] == ["model_000100", "model_000200", "model_000300"]
    out = torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=True)
    check_average(out, sds)
    assert out["lm_head.weight"].data_ptr() == out["transformer.wte.weight"].data_ptr()
    assert json.loads((tmp_path / "avg" / "meta_000300.json").read_text())["step"] == 300


def test_lightning_ckpt(plain_run, tmp_path):
    run = tmp_path / "lightning"
    run.mkdir()
    sds = []
    for s in (100, 200, 300):
        ck = torch.load(plain_run / f"ckpt_{s}.pt", weights_only=True)
        sd = OrderedDict((f"model.{k}", v) for k, v in ck["model"].items())
        obj = {"epoch": 0, "global_step": s, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
               "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}},
               "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(1.0)}},
               "optimizer_states": [ck["optimizer"]], "lr_schedulers": [],
               "hparams_name": "kwargs", "hyper_parameters": {"lr": 3e-3}}
        torch.save(obj, run / f"epoch=0-step={s}.ckpt")
        sds.append(sd)
    torch.save(obj, run / "last.ckpt")  # no step in its name: not a revision of the range
    res = average([str(run), "-o", str(tmp_path / "avg")])
    assert [s["step"] for s in res["plan"]["inputs"]] == [100, 200, 300]
    out = torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=True)
    assert set(out) == {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops",
                        "hparams_name", "hyper_parameters"} and out["global_step"] == 300
    check_average(out["state_dict"], sds)


def test_views_with_offsets_and_strides(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sds = []
    for s in (1, 2, 3):
        torch.manual_seed(s)
        fused = torch.randn(12, 8)
        big = torch.randn(6, 10)
        sd = OrderedDict(q=fused[:4], k=fused[4:8], v=fused[8:], cols=big[:, 2:7], small_t=torch.randn(5, 3).t(),
                         scalar=torch.tensor(float(s)))
        torch.save({"model": sd}, run / f"ckpt_{s}.pt")
        sds.append({k: v.contiguous() for k, v in sd.items()})
    average([str(run), "-o", str(tmp_path / "avg")])
    check_average(torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=True)["model"], sds)
    bad = tmp_path / "bad"
    bad.mkdir()
    for s in (1, 2):  # a transpose of 300 x 300: 90,000 one-element runs, refused
        torch.save({"model": {"w": torch.randn(300, 300).t()}}, bad / f"ckpt_{s}.pt")
    before = tree_digest(bad)
    r = runner.invoke(app, ["average", str(bad), "-o", str(tmp_path / "t")])
    check_refused(r.exit_code, r.stderr, r.output, ["strided view", ".contiguous()"], out=tmp_path / "t",
                  inputs=bad, before=before)


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _break(kind: str, run: Path, marker: Path) -> None:
    f = run / "ckpt_300.pt"
    ck = torch.load(f, weights_only=True)
    if kind == "legacy":
        torch.save(ck, f, _use_new_zipfile_serialization=False)
    elif kind == "os.system":
        ck["config"]["hook"] = _System(f"touch {marker}")
        torch.save(ck, f)
    elif kind == "missing-key":
        del ck["model"]["transformer.h.1.mlp.c_fc.bias"]
        torch.save(ck, f)
    elif kind == "shape-change":
        ck["model"]["transformer.wpe.weight"] = torch.zeros(8, ARGS["n_embd"])
        torch.save(ck, f)
    elif kind == "truncated-model":
        data = f.read_bytes()
        f.write_bytes(data[: int(len(data) * 0.15)])
    elif kind == "not-a-zip":
        f.write_bytes(pickle.dumps({"model": 1}))


@pytest.mark.parametrize("kind,expected", [
    ("legacy", ["ckpt_300.pt", "legacy (non-zip) format", "torch.save(torch.load("]),
    ("os.system", ["ckpt_300.pt", "posix.system", "no class"]),
    ("missing-key", ["'transformer.h.1.mlp.c_fc.bias' is in ckpt_100 but not in ckpt_300"]),
    ("shape-change", ["'transformer.wpe.weight': shape [16, 32] in ckpt_100 but [8, 32] in ckpt_300"]),
    ("truncated-model", ["ckpt_300.pt", "truncated", "model tensor"]),
])
def test_bad_inputs_are_refused(kind, expected, plain_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for s in (100, 200, 300):
        (run / f"ckpt_{s}.pt").write_bytes((plain_run / f"ckpt_{s}.pt").read_bytes())
    marker = tmp_path / "pwned"
    _break(kind, run, marker)
    (tmp_path / "outs").mkdir()
    out = tmp_path / "outs" / "avg"
    before = tree_digest(run)
    r = runner.invoke(app, ["average", str(run), "-o", str(out)])
    check_refused(r.exit_code, r.stderr, r.output, expected, out=out, inputs=run, before=before)
    assert not marker.exists() and leftovers(out) == []


def test_to_hf_same_logits_as_nanogpt(plain_run, tmp_path):
    from transformers import GPT2LMHeadModel

    average([str(plain_run), "-r", "300..500", "-o", str(tmp_path / "nano")])
    res = average([str(plain_run), "-r", "300..500", "--to", "hf", "-o", str(tmp_path / "hf")])
    assert res["plan"]["output_format"] == "gpt2" and res["plan"]["warnings"] == []
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors", "README.md",
                                                             "merger.json"}
    nano = load_nanogpt(tmp_path / "nano" / "ckpt.pt").eval()
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    x = torch.randint(0, ARGS["vocab_size"], (3, ARGS["block_size"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, nano(x)[0], rtol=1e-5, atol=1e-5)


def test_to_hf_compiled_and_no_bias(tmp_path, compiled_run):
    global ARGS
    saved = ARGS
    ARGS = dict(saved, bias=False)
    try:
        run = train_run(tmp_path / "nobias", compiled=True, seed=3)
    finally:
        ARGS = saved
    average([str(run), "-r", "400..500", "-o", str(tmp_path / "nano")])
    average([str(run), "-r", "400..500", "--to", "hf", "-o", str(tmp_path / "hf")])
    from transformers import GPT2LMHeadModel

    nano = load_nanogpt(tmp_path / "nano" / "ckpt.pt").eval()
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, nano(x)[0], rtol=1e-5, atol=1e-5)


def test_eval_needs_a_tokenizer_and_takes_one(plain_run, tmp_path):
    from merger.testing.tokenizer import save_byte_tokenizer

    average([str(plain_run), "-r", "400..500", "--to", "hf", "-o", str(tmp_path / "hf")])
    r = runner.invoke(app, ["eval", str(tmp_path / "hf"), "--limit", "2"])
    assert r.exit_code == 1 and "no tokenizer files" in r.stderr and "--tokenizer" in r.stderr, r.output
    save_byte_tokenizer(tmp_path / "tok")
    r = runner.invoke(app, ["eval", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "tok"), "--limit", "2",
                            "--tasks", "merger_pydocs_ppl", "--device", "cpu", "--json",
                            "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["config"]["tokenizer"] == str(tmp_path / "tok")
    assert report["models"][0]["scores"]["merger_pydocs_ppl"]


def test_same_bits_on_both_kernels_ema_small_budget_and_resume(plain_run, tmp_path):
    """The torch kernel (--hash) gives the native kernel's bits; EMA works; a tiny budget and
    shard size (many blocks and shards) change nothing; a Ctrl-C'd run resumes to the same file."""
    from merger.api import average as api_average
    from merger.plan import Options
    from merger.plan.methods import Method
    from helpers.checks import Interrupt, partial_of

    def model_of(out: Path) -> dict:
        return torch.load(out / "ckpt.pt", weights_only=True)["model"]

    base = ["--method", "ema", "--decay", "0.7"]
    average([str(plain_run), *base, "-o", str(tmp_path / "native")])
    average([str(plain_run), *base, "--hash", "-o", str(tmp_path / "torch")])
    average([str(plain_run), *base, "--max-memory", "400KB", "--max-shard-size", "20KB", "-o", str(tmp_path / "small")])
    ref = model_of(tmp_path / "native")
    for other in ("torch", "small"):
        got = model_of(tmp_path / other)
        assert all(torch.equal(got[k], ref[k]) for k in ref), other
    opts = Options(method=Method("ema", decay=0.7), max_shard_size=20_000, max_memory=400_000)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        api_average([str(plain_run)], options=opts, output=out, progress=Interrupt(2))
    assert not out.exists() and (partial_of(out) / "progress.json").exists()
    _, res = api_average([str(plain_run)], options=Options(**{**opts.__dict__, "resume": True}), output=out)
    assert res.resumed_shards
    assert (out / "ckpt.pt").read_bytes() == (tmp_path / "native" / "ckpt.pt").read_bytes()


@pytest.mark.parametrize("to,expected", [("hf", ["is not a nanoGPT GPT-2 model", "encoder.weight"]),
                                         ("nanogpt", ["is not a torch training checkpoint"])])
def test_an_output_format_that_cannot_hold_the_merge_is_refused_before_reading(to, expected, tmp_path):
    """``--to hf`` of a .pt that isn't nanoGPT's GPT-2, ``--to nanogpt`` of a safetensors folder:
    refused at planning (the progress bar never starts), nothing written, inputs unchanged."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    for s in (100, 200):
        if to == "hf":
            run.mkdir(exist_ok=True)
            args = {"n_layer": 1, "n_head": 1, "n_embd": 4, "block_size": 8, "vocab_size": 10}
            torch.save({"model": {"encoder.weight": torch.randn(4, 4)}, "model_args": args, "iter_num": s},
                       run / f"ckpt_{s}.pt")
        else:
            (run / f"step{s}").mkdir(parents=True)
            save_file({"w": torch.randn(4, 4)}, run / f"step{s}" / "model.safetensors")
    before = tree_digest(run)
    out = tmp_path / "out"
    r = runner.invoke(app, ["average", str(run), "--to", to, "-o", str(out)])
    err = check_refused(r.exit_code, r.stderr, r.output, expected, out=out, inputs=run, before=before)
    assert "hint: " in err and "Merging" not in r.stderr


def test_to_safetensors_stores_a_tied_tensor_once_as_safetensors_does(plain_run, tmp_path):
    """``--to safetensors``: keys as in the input, the tied head stored once (as
    ``safetensors.torch.save_model`` stores shared tensors), and ``safetensors.torch.load_model``
    ties it back: the model's logits are the merged ckpt.pt's."""
    from safetensors.torch import load_file, load_model

    average([str(plain_run), "-r", "400..500", "--to", "safetensors", "-o", str(tmp_path / "st")])
    average([str(plain_run), "-r", "400..500", "-o", str(tmp_path / "pt")])
    flat = load_file(tmp_path / "st" / "model.safetensors")
    assert "transformer.wte.weight" in flat and "lm_head.weight" not in flat
    model, ref = GPT(GPTConfig(**ARGS)), GPT(GPTConfig(**ARGS))
    missing, unexpected = load_model(model, tmp_path / "st" / "model.safetensors", strict=True)
    assert not missing and not unexpected
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    ref.load_state_dict(torch.load(tmp_path / "pt" / "ckpt.pt", weights_only=True)["model"])
    x = torch.randint(0, ARGS["vocab_size"], (2, ARGS["block_size"]))
    assert torch.equal(model.eval()(x)[0], ref.eval()(x)[0])
