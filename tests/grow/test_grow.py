"""`merger grow`: exact zero-pad embedding, λ scaling, seeds, init statistics, transformers loading,
identity layers, buffers, Hub sources and bad inputs, all through real files (save_pretrained) and
the real CLI (CliRunner on merger.cli.app)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import load_dir
from merger.cli import app

runner = CliRunner()
ARCHS = ("gpt_neox", "gpt2")


def small_model(arch: str, *, heads: int = 2, layers: int = 2, hidden: int = 16, init_range: float = 0.02,
                dtype=torch.float32, seed: int = 0):
    """A tiny randomly *trained-looking* model: every parameter (LayerNorms too) drawn N(0, 0.5²)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=257, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden, max_position_embeddings=32, rotary_pct=0.25,
                            use_parallel_residual=True, tie_word_embeddings=False, initializer_range=init_range,
                            bos_token_id=256, eos_token_id=256, hidden_dropout=0.0, attention_dropout=0.0)
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=257, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=32,
                         initializer_range=init_range, bos_token_id=256, eos_token_id=256,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.to(dtype).eval()


def save_small(model, folder: Path) -> Path:
    from merger.testing.tokenizer import byte_tokenizer

    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(params=ARCHS)
def small(request, tmp_path):
    model = small_model(request.param)
    return request.param, model, save_small(model, tmp_path / f"small-{request.param}")


def grow_cli(src, out, *args):
    r = runner.invoke(app, ["grow", str(src), "-o", str(out), *map(str, args)])
    assert r.exit_code == 0, r.output
    return r


def positions(arch: str, name: str, shape, small_hidden: int, big_hidden: int):
    """Independent of merger.grow.arch: where a small tensor's entries sit in the grown one, written
    out from each architecture's documented layout."""
    def ax(kind, n):
        if kind == "qkv_gpt2":  # c_attn output: [q | k | v], each small_hidden wide
            return torch.cat([torch.arange(small_hidden) + j * big_hidden for j in range(3)])
        return torch.arange(n)  # hidden, MLP, NeoX [heads, (q,k,v), head_dim] rows and vocab: prefixes
    kinds = ["qkv_gpt2" if arch == "gpt2" and "c_attn" in name and i == len(shape) - 1 else "prefix"
             for i in range(len(shape))]
    return torch.meshgrid(*[ax(k, n) for k, n in zip(kinds, shape)], indexing="ij")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ---- exact embedding and λ ------------------------------------------------------------------------

def test_exact_zero_pad_embedding(small, tmp_path):
    arch, _, src = small
    grow_cli(src, tmp_path / "big", "--width", 2, "--shrink", 1, "--perturb", 0)
    big = load_dir(tmp_path / "big")
    saved = load_dir(src)
    assert set(big) == set(saved)
    for k, s in saved.items():
        b = big[k]
        ix = positions(arch, k, s.shape, 16, 32)
        assert torch.equal(bits(b[ix].contiguous()), bits(s)), f"{k}: small entries not bit for bit"
        rest = torch.ones_like(b, dtype=torch.bool)
        rest[ix] = False
        assert (b[rest] == 0).all(), f"{k}: a new entry is not 0"
        assert b.shape[-1] in (s.shape[-1], 2 * s.shape[-1]), k
    cfg = json.loads((tmp_path / "big" / "config.json").read_text())
    keys = {"gpt_neox": ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers"),
            "gpt2": ("n_embd", "n_head", "n_inner", "n_layer")}[arch]
    assert [cfg[k] for k in keys] == [32, 4, 128 if arch == "gpt_neox" else None, 2]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "big" / f).read_bytes() == (src / f).read_bytes()
    m = json.loads((tmp_path / "big" / "merger.json").read_text())
    assert (m["shrink"], m["perturb"], m["seed"], m["init"], m["width"], m["depth"]) == (1, 0, 0, "mup", 2, 1)
    assert m["source"]["path"] == str(src.resolve())


def test_negative_zero_survives(tmp_path):
    model = small_model("gpt_neox")
    with torch.no_grad():
        model.gpt_neox.layers[0].attention.dense.bias[0] = -0.0
    src = save_small(model, tmp_path / "s")
    grow_cli(src, tmp_path / "big", "--width", 2, "--shrink", 1, "--perturb", 0)
    b = load_dir(tmp_path / "big")["gpt_neox.layers.0.attention.dense.bias"]
    assert math.copysign(1, float(b[0])) == -1 and math.copysign(1, float(b[-1])) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shrink_is_exact(tmp_path, dtype):
    lam = 0.37
    src = save_small(small_model("gpt_neox", dtype=dtype), tmp_path / "s")
    grow_cli(src, tmp_path / "big", "--width", 2, "--shrink", lam, "--perturb", 0)
    big, saved = load_dir(tmp_path / "big"), load_dir(src)
    for k, s in saved.items():
        ix = positions("gpt_neox", k, s.shape, 16, 32)
        want = (s.double() * lam).to(dtype)  # one product in float64, one rounding to the dtype
        assert big[k].dtype == dtype and torch.equal(bits(big[k][ix].contiguous()), bits(want)), k


def test_old_entries_are_shrink_plus_perturb(tmp_path):
    """λ·small + σ·fresh, with fresh the σ=1, λ=0 output of the same seed (float64 reference)."""
    src = save_small(small_model("gpt2"), tmp_path / "s")
    grow_cli(src, tmp_path / "fresh", "--width", 2, "--shrink", 0, "--perturb", 1, "--seed", 5)
    grow_cli(src, tmp_path / "mix", "--width", 2, "--shrink", 0.4, "--perturb", 0.3, "--seed", 5)
    fresh, mix, saved = load_dir(tmp_path / "fresh"), load_dir(tmp_path / "mix"), load_dir(src)
    for k, s in saved.items():
        ref = 0.3 * fresh[k].double()
        ix = positions("gpt2", k, s.shape, 16, 32)
        ref[ix] += 0.4 * s.double()
        torch.testing.assert_close(mix[k].double(), ref, rtol=0, atol=2e-7 * (1 + ref.abs().max().item()))


# ---- seeds and the fresh init ---------------------------------------------------------------------

def test_same_seed_same_bytes(tmp_path):
    src = save_small(small_model("gpt_neox"), tmp_path / "s")
    grow_cli(src, tmp_path / "a", "--seed", 3)
    grow_cli(src, tmp_path / "b", "--seed", 3)
    grow_cli(src, tmp_path / "c", "--seed", 4)
    grow_cli(src, tmp_path / "d", "--seed", 3, "--max-shard-size", "20KB")
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "c" / "model.safetensors").read_bytes()
    sharded = load_dir(tmp_path / "d")  # seeded per tensor name: sharding changes nothing
    assert len(list((tmp_path / "d").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "d" / "model.safetensors.index.json").is_file()
    assert all(torch.equal(v, sharded[k]) for k, v in load_dir(tmp_path / "a").items())


def expected_std(arch: str, name: str, init: str, w: int, layers: int, r: float) -> float | None:
    """The rule written out: None for constants (LayerNorm, biases)."""
    if name.endswith("bias") or "norm" in name or ".ln_" in name:
        return None
    if any(e in name for e in ("embed_in", "wte", "wpe")):
        return r  # input weights: fan-in (vocab, positions) does not grow
    if "embed_out" in name or "lm_head" in name:
        return r / w if init == "mup" else r  # μP output layer: 1/fan_in
    std = r / math.sqrt(2 * layers) if arch == "gpt2" and "c_proj" in name else r
    return std / math.sqrt(w) if init == "mup" else std  # hidden matrices: 1/sqrt(fan_in)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["mup", "standard"])
def test_fresh_init_std(tmp_path, arch, init):
    r, w = 0.05, 4
    src = save_small(small_model(arch, init_range=r), tmp_path / "s")
    grow_cli(src, tmp_path / "big", "--width", w, "--depth", 2, "--shrink", 0, "--perturb", 1, "--init", init)
    for k, t in load_dir(tmp_path / "big").items():
        want = expected_std(arch, k, init, w, 4, r)
        if want is None:
            assert (t == (1.0 if k.endswith("weight") else 0.0)).all(), k
            continue
        if "layers.1." in k or ".h.1." in k or "layers.3." in k or ".h.3." in k:  # new layers
            if any(s in k for s in ("attention.dense", "dense_4h_to_h", "c_proj")):
                assert (t == 0).all(), f"{k}: a new layer's residual output must start at 0"
                continue
        n = t.numel()
        s = t.double().std().item()
        assert abs(s / want - 1) < 5 / math.sqrt(2 * n), f"{k}: std {s:.5f}, rule {want:.5f} (n={n})"
        assert abs(t.double().mean().item()) < 5 * want / math.sqrt(n), k


# ---- the grown model in transformers --------------------------------------------------------------

def test_loads_in_transformers(small, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, _, src = small
    grow_cli(src, tmp_path / "big", "--width", 2, "--depth", 2)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "big", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    logits = model.eval()(torch.arange(20)[None]).logits
    assert logits.shape == (1, 20, 257) and torch.isfinite(logits).all()
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 32


def logits_of(folder, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


@pytest.mark.parametrize("depth", [2, 1.5])
def test_new_layers_are_identities(small, tmp_path, depth):
    arch, _, src = small
    grow_cli(src, tmp_path / "deep", "--width", 1, "--depth", depth, "--shrink", 1, "--perturb", 0)
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = logits_of(src, ids), logits_of(tmp_path / "deep", ids)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    lmap = json.loads((tmp_path / "deep" / "merger.json").read_text())["layer_map"]
    assert lmap == ([0, 2] if depth == 2 else [0, 1])


def _branch(model, module, x):
    """Run ``module`` inside a real forward of ``model``, with its hidden-state input replaced by
    ``x`` (so masks and rotary come from the model itself); return the module's output."""
    got = {}

    def pre(mod, args, kwargs):
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def post(mod, args, kwargs, out):
        got["out"] = out[0] if isinstance(out, tuple) else out

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.zeros(1, x.shape[1], dtype=torch.long))
    finally:
        h1.remove()
        h2.remove()
    return got["out"]


def test_layout_keeps_each_head(small, tmp_path):
    """Not the rules checked against themselves: with λ 1, σ 0, the grown attention and MLP of a
    real transformers model, fed the small input zero-padded, give the small outputs in the first
    d channels and exactly 0 in the new ones (a q/k/v row on the wrong head would break this)."""
    from transformers import AutoModelForCausalLM

    arch, _, src = small
    grow_cli(src, tmp_path / "big", "--width", 2, "--shrink", 1, "--perturb", 0)
    s = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "big").eval()
    x = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(1))
    xp = torch.cat([x, torch.zeros(1, 12, 16)], dim=-1)
    layer = (lambda m: m.gpt_neox.layers[1]) if arch == "gpt_neox" else (lambda m: m.transformer.h[1])
    for part in (("attention",) if arch == "gpt_neox" else ("attn",)) + ("mlp",):
        small_out = _branch(s, getattr(layer(s), part), x)
        big_out = _branch(b, getattr(layer(b), part), xp)
        torch.testing.assert_close(big_out[..., :16], small_out, rtol=1e-5, atol=1e-5)
        assert (big_out[..., 16:] == 0).all(), part


def test_buffers_rebuilt_not_padded(tmp_path):
    """Old Pythia checkpoints carry masks and rotary inv_freq: the grown ones are recomputed."""
    model = small_model("gpt_neox")
    src = save_small(model, tmp_path / "s")
    sd = load_dir(src)
    for i in range(2):
        p = f"gpt_neox.layers.{i}.attention."
        sd[p + "rotary_emb.inv_freq"] = torch.full((1,), 7.0)  # wrong on purpose: must be rebuilt
        sd[p + "bias"] = torch.tril(torch.ones(32, 32, dtype=torch.bool)).view(1, 1, 32, 32)
        sd[p + "masked_bias"] = torch.tensor(-1e9)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    grow_cli(src, tmp_path / "big", "--width", 2, "--depth", 2)
    big = load_dir(tmp_path / "big")
    rot = int(8 * 0.25)  # head dim 8, rotary_pct 0.25
    want = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    for i in range(4):
        p = f"gpt_neox.layers.{i}.attention."
        assert torch.equal(big[p + "rotary_emb.inv_freq"], want)
        assert torch.equal(big[p + "bias"], torch.tril(torch.ones(32, 32, dtype=torch.bool)).view(1, 1, 32, 32))
        assert big[p + "masked_bias"].item() == -1e9


def test_hub_revision_source(tmp_path):
    from merger.sources.hub import cache_dir
    from merger.testing.hubcache import write_cache_revision

    src = save_small(small_model("gpt_neox"), tmp_path / "s")
    commit = write_cache_revision(cache_dir(), "local/grow-test", "step100", src)
    r = runner.invoke(app, ["grow", "local/grow-test@step100", "-o", str(tmp_path / "big"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["source"]["repo_id"] == "local/grow-test" and d["source"]["commit"] == commit
    assert d["grown"]["hidden"] == 32 and d["shrink"] == 0.5 and d["perturb"] == 1.0
    assert json.loads((tmp_path / "big" / "merger.json").read_text())["source"]["revision"] == "step100"


def test_cli_defaults_match_library():
    from merger.cli import grow as grow_cli
    from merger.grow import run

    assert (grow_cli.SHRINK, grow_cli.PERTURB, grow_cli.INIT) == (run.DEFAULT_SHRINK, run.DEFAULT_PERTURB,
                                                                   run.DEFAULT_INIT)
    r = runner.invoke(app, ["grow", "--help"])
    assert r.exit_code == 0 and "interleaved" in r.stdout and "merger grow tiny/step800" in r.stdout


# ---- bad inputs -----------------------------------------------------------------------------------

def _llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    return folder


def _no_config(folder: Path) -> Path:
    save_small(small_model("gpt2"), folder)
    (folder / "config.json").unlink()
    return folder


BAD = {
    "width 1.5 on one head": (lambda f: save_small(small_model("gpt_neox", heads=1), f), ["--width", "1.5"],
                              "1 x 1.5 = 1.5 attention heads"),
    "shrinking": (lambda f: save_small(small_model("gpt2"), f), ["--width", "0.5"], "would shrink the model"),
    "depth below 1": (lambda f: save_small(small_model("gpt2"), f), ["--depth", "0.5"], "would shrink"),
    "unknown architecture": (_llama, [], "model_type 'llama' (LlamaForCausalLM) is not supported by merger grow; "
                             "supported: gpt_neox (GPTNeoXForCausalLM), gpt2 (GPT2LMHeadModel)"),
    "missing config": (_no_config, [], "has no config.json"),
    "negative perturb": (lambda f: save_small(small_model("gpt2"), f), ["--perturb", "-1"], "must be a finite"),
    "repo without revision": (None, [], "which revision of local/nothing-here?"),
    # sizes, checked from the shapes before anything is planned (--depth 1e7 planned for minutes, then MemoryError)
    "depth 1e7": (lambda f: save_small(small_model("gpt2"), f), ["--depth", "1e7"],
                  "from 2 to 20000000 layers, more than merger grow makes (65536)"),
    "width 1000 (a 24 GB float64 c_fc)": (lambda f: save_small(small_model("gpt2"), f), ["--width", "1000"],
                                          "to hidden 16000, MLP 64000, 2 layers needs about"),
    "width 8 over --max-memory 1MB": (lambda f: save_small(small_model("gpt2"), f),
                                      ["--width", "8", "--max-memory", "1MB"],
                                      "(its largest tensor, transformer.h.0.mlp.c_fc.weight [128, 512], is 262.14 KB, "
                                      "made in float64; 28 tensors), more than --max-memory 1.00 MB"),
    # values: a grown tensor that isn't finite in its dtype is refused, not written
    "perturb 1e308": (lambda f: save_small(small_model("gpt2"), f), ["--perturb", "1e308"],
                      "--perturb 1e+308 make tensor"),
    "shrink 1e300": (lambda f: save_small(small_model("gpt_neox"), f), ["--shrink", "1e300", "--perturb", "0"],
                     "inf or NaN in float32: nothing was written"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(tmp_path, case):
    make, args, message = BAD[case]
    src = make(tmp_path / "small") if make else "local/nothing-here"
    before = {p: p.read_bytes() for p in sorted(Path(src).rglob("*")) if p.is_file()} if make else {}
    out = tmp_path / "out"
    r = runner.invoke(app, ["grow", str(src), "-o", str(out), *args])
    assert r.exit_code == 1, r.output
    assert "Error:" in r.stderr and message in r.stderr, r.stderr
    assert "hint:" in r.stderr and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".out*")), "output left behind"
    if make:
        assert before == {p: p.read_bytes() for p in sorted(Path(src).rglob("*")) if p.is_file()}


def test_max_memory_that_fits_grows(tmp_path):
    """--max-memory is a limit, not a setting: a growth within it gives the same bytes as without."""
    src = save_small(small_model("gpt2"), tmp_path / "s")
    for out, extra in (("a", []), ("b", ["--max-memory", "2MB"])):
        r = runner.invoke(app, ["grow", str(src), "-o", str(tmp_path / out), "--width", "8", *extra])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_existing_output_needs_force(tmp_path):
    src = save_small(small_model("gpt2"), tmp_path / "s")
    grow_cli(src, tmp_path / "big")
    r = runner.invoke(app, ["grow", str(src), "-o", str(tmp_path / "big")])
    assert r.exit_code == 1 and "already exists" in r.stderr
    grow_cli(src, tmp_path / "big", "--force", "--seed", 1)
    shutil.rmtree(tmp_path / "big")
