"""No code from a model or tokenizer folder, ever.

A folder's ``config.json`` or ``tokenizer_config.json`` may map transformers' Auto classes to
Python files in the folder (``auto_map``). transformers runs them with ``trust_remote_code=True``
and, when the argument is left out, asks on stdin (a silent open stdin blocks; ``y`` runs the
code). Every transformers and lm-eval load in merger passes ``trust_remote_code=False``: the
folder's code never runs, nothing reads stdin, and a folder only its own code could load gets
:func:`remote_code_error`.
"""

from __future__ import annotations

from merger.errors import EvalError


def remote_code_error(who: str, what: str, e: Exception) -> EvalError | None:
    """The error for transformers refusing ``who``'s ``what`` (e.g. "its tokenizer") because only
    Python code in its folder could load it (transformers' ValueError then asks for
    ``trust_remote_code=True``), or None for any other failure."""
    if "trust_remote_code" not in str(e):
        return None
    return EvalError(f"{who}: only Python code in the folder could load {what} (auto_map in its config.json or "
                     "tokenizer_config.json names classes transformers doesn't have); merger never runs a "
                     "model's or tokenizer's own code",
                     hint="use a model or tokenizer whose model_type / tokenizer_class transformers has built in")

