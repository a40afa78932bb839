"""Loading models and tokenizers for the stages (hub ids or local directories)."""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_dtype(name: str, dev: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cpu" and name in ("bfloat16", "float16"):
        # Half precision on CPU is slow and lossy for training; CPU runs use float32.
        return torch.float32
    return DTYPES[name]


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name: str,
    *,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    dev: torch.device | None = None,
    load_dtype: torch.dtype | None = None,
):
    """``name``'s weights on ``dev`` in the spec ``dtype`` (inference), or in ``load_dtype`` when given
    (training: float32 master weights, see ``training.precision``)."""
    from transformers import AutoModelForCausalLM

    dev = dev or device()
    model = AutoModelForCausalLM.from_pretrained(
        name, revision=revision, dtype=load_dtype or torch_dtype(dtype, dev), trust_remote_code=trust_remote_code
    )
    return model.to(dev)
