"""How ``merger sweep`` scores a model: held-out bits per byte in-process, or any lm-eval task.

``HeldoutScorer`` computes the task pack's held-out perplexity metrics (bits per byte, byte and
word perplexity) with the same rolling windows and counts as lm-eval's ``merger_pydocs_ppl``,
without lm-eval's per-model overhead: it loads a state dict into one model built once.
``LmEvalScorer`` saves each model to a temporary folder and calls :func:`merger.eval.harness.evaluate`.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from pathlib import Path

import torch

from merger.errors import EvalError
from merger.units import apply_limit, parse_limit
from merger.formats.hf_folder import COPY_FILES
from merger.eval.state import StateDict
from merger.eval.remote_code import remote_code_error

HELDOUT = ("bits_per_byte", "byte_perplexity", "word_perplexity")  # in-process; lower is better


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list, list]]:
    """(input ids, predicted ids) per window, the predicted ids scored at the input's last
    positions: lm-eval's ``loglikelihood_rolling`` (``get_rolling_token_windows`` with context_len
    1, then ``make_disjoint_window``). Every token is predicted once, the first after ``prefix``."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    out = [([prefix] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        end = done + min(len(tokens) - done, max_length)
        out.append((tokens[max(0, end - max_length - 1): end - 1], tokens[done:end]))
        done = end
    return out


def _max_length(config, tokenizer) -> int:
    """The model's context, found as lm-eval's HFLM finds it (config, tokenizer, else 2048)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    m = getattr(tokenizer, "model_max_length", None)
    return m if isinstance(m, int) and 0 < m < 10**9 else 2048


class HeldoutScorer:
    """Bits per byte, byte and word perplexity on the task pack's held-out passages, in-process.

    Each state dict becomes a model through ``from_pretrained(state_dict=...)`` (so transformers'
    checkpoint key renames apply), in float32 under ``torch.no_grad``. Windows are sorted by
    length and batched once, right-padded: in a causal model padding never reaches a scored
    position, and the same batches on every call make the numbers deterministic.
    """

    higher_is_better = {m: False for m in HELDOUT}

    def __init__(self, folder: str | Path, *, limit: int | float | None = None,
                 device: str = "cpu", batch_tokens: int | None = None):
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer

        from merger.eval.tasks.pydocs import ppl_records
        from merger.eval.textdata import split_docs

        try:
            self.config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # never the folder's code
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            self.model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(self.config)]
        except (OSError, ValueError, KeyError) as e:
            refused = remote_code_error(str(folder), "its config or tokenizer", e)
            if refused is not None:
                raise refused from None
            raise EvalError(f"{folder}: transformers can't load a causal LM config and tokenizer "
                            f"from it: {type(e).__name__}: {e}",
                            hint="the latest revision needs config.json and tokenizer files (or pass "
                                 "--tokenizer NAME_OR_PATH)") from e
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix is None:
            raise EvalError(f"{folder}: the tokenizer has no BOS or EOS token to start with")
        self.device = torch.device(device)
        texts = [r["text"] for r in ppl_records(split_docs()[1])]
        if limit is not None:  # as lm-eval's --limit: N documents, or a fraction (ceil)
            texts = texts[: apply_limit(len(texts), parse_limit(limit))]
        self.max_length = L = _max_length(self.config, tok)
        self.n_texts, self.n_bytes = len(texts), sum(len(t.encode("utf-8")) for t in texts)
        self.n_words = sum(len(re.split(r"\s+", t)) for t in texts)
        windows = [w for t in texts
                   for w in rolling_windows(tok.encode(t, add_special_tokens=False), prefix, L)]
        self.n_tokens = sum(len(p) for _, p in windows)
        vocab = int(getattr(self.config, "vocab_size", 0) or len(tok))
        budget = batch_tokens or max(L, min(1 << 14, (1 << 27) // vocab))  # fp32 logits <= 512 MB
        windows.sort(key=lambda w: -len(w[0]))
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # ids, targets (-100: unscored)
        i = 0
        while i < len(windows):
            width = len(windows[i][0])
            rows = windows[i: i + max(1, budget // width)]
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            tgt = torch.full((len(rows), width), -100, dtype=torch.long)
            for r, (inp, pred) in enumerate(rows):
                ids[r, : len(inp)] = torch.tensor(inp)
                tgt[r, len(inp) - len(pred): len(inp)] = torch.tensor(pred)
            self.batches.append((ids, tgt))
            i += len(rows)

    def describe(self) -> dict:
        return {"kind": "in-process", "texts": "merger_pydocs_ppl (held-out Python docs)",
                "passages": self.n_texts, "bytes": self.n_bytes, "words": self.n_words,
                "tokens": self.n_tokens, "max_length": self.max_length,
                "forward_passes": len(self.batches), "dtype": "float32", "device": str(self.device)}

    def load(self, state_dict: StateDict):
        """A float32 model on ``device`` with these weights (names as stored in checkpoints)."""
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # no load report, no progress bar: the library is quiet
        hf_logging.disable_progress_bar()
        try:
            model, info = self.model_class.from_pretrained(
                None, config=self.config, state_dict=dict(state_dict), dtype=torch.float32,
                output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise EvalError("the checkpoints lack weights the model needs: "
                            + ", ".join(missing[:5])
                            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""),
                            hint="the checkpoints and config.json must be of one architecture")
        return model.to(self.device).eval()

    @torch.no_grad()
    def score(self, state_dict: StateDict) -> dict[str, float]:
        """``{"bits_per_byte", "byte_perplexity", "word_perplexity"}`` of these weights."""
        model = self.load(state_dict)
        nll = 0.0  # nats, summed in float64
        for ids, tgt in self.batches:
            logits = model(input_ids=ids.to(self.device)).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), tgt.to(self.device).flatten(), reduction="none")
            nll += float(loss.double().sum())
        return {"bits_per_byte": nll / (self.n_bytes * math.log(2)),
                "byte_perplexity": math.exp(nll / self.n_bytes),
                "word_perplexity": math.exp(nll / self.n_words)}


class LmEvalScorer:
    """Any lm-eval task through :func:`merger.eval.harness.evaluate`, on temporary model folders."""

    def __init__(self, tasks: tuple[str, ...], *, limit, device: str, workdir: Path):
        self.tasks, self.limit, self.device, self.workdir = list(tasks), limit, device, workdir
        self.higher_is_better: dict[str, bool | None] = {}

    def describe(self) -> dict:
        return {"kind": "lm-eval", "tasks": self.tasks, "limit": self.limit, "device": self.device}

    def score_many(self, models: list[str | StateDict], like: Path) -> list[dict[str, float]]:
        """Scores of each model: a folder, or a state dict saved (as ``merger average`` would)
        with the config and tokenizer files of the folder ``like``."""
        from safetensors.torch import save_file

        from merger.eval.harness import evaluate

        with tempfile.TemporaryDirectory(prefix=".sweep-", dir=self.workdir) as tmp:
            paths = []
            for j, m in enumerate(models):
                if isinstance(m, dict):
                    folder = Path(tmp) / f"model{j}"
                    folder.mkdir()
                    save_file(m, folder / "model.safetensors", metadata={"format": "pt"})
                    for f in COPY_FILES:
                        if (Path(like) / f).is_file():
                            shutil.copyfile(Path(like) / f, folder / f)
                    m = str(folder)
                paths.append(m)
            report = evaluate(paths, tasks=self.tasks, limit=self.limit, device=self.device)
        for task, d in report.higher_is_better.items():
            self.higher_is_better.update({f"{task}/{metric}": hib for metric, hib in d.items()})
        return [{f"{s.task}/{s.name}": s.value for s in row.scores} for row in report.rows]
