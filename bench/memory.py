"""Peak memory of one SFT step and one OPD step at Qwen3-1.7B's real widths, naive path against ours.

    make bench   (or: .venv/bin/python bench/memory.py [--cases sft-new-16384,...] [--limit-gib 16])

The model is a random Qwen3 with Qwen3-1.7B's shapes (hidden 2048, 16 heads, 8 KV heads, head_dim 128,
intermediate 6144, vocabulary 151,936, tied embeddings) but 2 decoder layers, in fp32 on the CPU, fully
fine-tuned with AdamW. Each case runs in a fresh subprocess that reports its peak resident memory
(``ru_maxrss``) and the resident memory just before the step, once weights, gradients and AdamW states
exist ("weights+optimizer"); "above" is the difference: what the step itself costs.

- ``sft``: one packed row of T tokens (4 traces of T/4, prompts 1/8 of each).
- ``opd-kl`` / ``opd-is``: one OPD train step (no sampling) on 8 samples of T/8 tokens (prompts 1/8),
  local teacher of the same shape, loss ``full_forward_kl`` / ``importance_sampling``.
- ``attn``: one attention layer alone on a packed row of T tokens (4 traces): ``sdpa_varlen`` (new)
  against transformers' sdpa with the T x T mask it derives from the position ids (naive).
- ``head``: the loss head alone (random final hidden states -> SFT cross-entropy), to show that its
  memory does not grow with the number of token chunks.
- ``headkl``: the head with a dense teacher's head beside it (random hidden states of both -> forward KL
  over the full vocabulary, the entropy metric): OPD ``full_forward_kl``'s loss head alone.

Paths: ``new`` is the stages' own code (``sft.trainer.micro_batch_nll``, ``distill.learner.
train_on_samples``: hidden states + chunked head, packing by position ids with the attention
``activations.use_fast_attention`` picks (``sdpa_varlen`` on a CPU: one sdpa call per trace, no mask),
gradient checkpointing); ``naive`` reproduces the code before it (full fp32 logits, a dense
B x 1 x T x T additive packing mask, teacher distributions as a dense (B, T, V) tensor, no
checkpointing). Every case
runs under a resident-memory limit (``--limit-gib``, default 14 on this 24 GiB machine); a case that
exceeds it reports "OOM at X GiB" instead of taking the machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 1024**3
SHAPE = dict(
    vocab_size=151936,
    hidden_size=2048,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=6144,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)
FULL, QUARTER = 16384, 4096
CASES = [  # most important first: partial runs still answer the targets
    ("sft", "new", FULL),
    ("sft", "new", QUARTER),
    ("sft", "naive", FULL),
    ("sft", "naive", QUARTER),
    ("opd-kl", "new", QUARTER),
    ("opd-kl", "naive", QUARTER),
    ("opd-kl", "naive", FULL),
    ("opd-kl", "new", FULL),
    ("head", "new", 1024),
    ("head", "new", 4096),
    ("head", "naive", 1024),
    ("head", "naive", 4096),
    ("opd-is", "new", FULL),
    ("opd-is", "new", QUARTER),
    ("opd-is", "naive", QUARTER),
    ("headkl", "new", 1024),
    ("headkl", "naive", 1024),
    ("attn", "new", FULL),
    ("attn", "naive", FULL),
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_model(seed: int):
    """Random weights without transformers' initialisers (minutes on a busy CPU): normal(0, 0.02)
    matrices, unit norms. The memory of a step does not depend on the values."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.initialization import no_init_weights

    gen = torch.Generator().manual_seed(seed)
    cfg = Qwen3Config(**SHAPE)
    cfg._attn_implementation = "sdpa"
    with no_init_weights():
        model = Qwen3ForCausalLM(cfg).float()
    model.tie_weights()  # the head shares the embedding's parameter, as in Qwen3-1.7B
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def ready_optimizer(model):
    """AdamW with its states and the gradients allocated, so the baseline holds weights+optimizer.

    The states are created here directly (zeros, as AdamW's first step would make them) rather than by a
    first step, whose temporaries would otherwise be counted in the process's peak."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    for p in params:
        p.grad = torch.zeros_like(p)  # backward accumulates into these buffers
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return opt


class PeakSampler:
    """Samples this process's resident memory every few milliseconds from a thread (torch's kernels
    release the GIL), so the peak of the step alone is known; ``ru_maxrss`` would include set-up."""

    def __init__(self, interval: float = 0.002, limit: int | None = None, on_limit=None):
        import threading

        self.peak = rss_bytes()
        self.limit, self.on_limit = limit, on_limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            if self.limit is not None and self.peak > self.limit and self.on_limit is not None:
                self.on_limit(self.peak)  # reports and ends the process before the machine runs out
            time.sleep(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def traces(tokens: int, count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = tokens // count
    p = n // 8
    return [
        (
            torch.randint(0, SHAPE["vocab_size"], (p,), generator=gen).tolist(),
            torch.randint(0, SHAPE["vocab_size"], (n - p,), generator=gen).tolist(),
        )
        for _ in range(count)
    ]


# --- the naive path: unchunked, as a simple implementation would write it ------------------------------


def naive_pack_mask(examples):
    """Simple packing: one row, restarted positions and a dense additive (1, 1, T, T) fp32 mask."""
    import torch

    T = sum(len(p) + len(c) for p, c in examples)
    ids, pos, seg, loss = (
        torch.zeros(1, T, dtype=torch.long),
        torch.zeros(1, T, dtype=torch.long),
        torch.zeros(1, T, dtype=torch.long),
        torch.zeros(1, T),
    )
    at = 0
    for k, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        ids[0, at : at + n] = torch.tensor(p + c)
        pos[0, at : at + n] = torch.arange(n)
        seg[0, at : at + n] = k
        loss[0, at + len(p) : at + n] = 1
        at += n
    allowed = (seg[:, :, None] == seg[:, None, :]) & (torch.arange(T)[:, None] >= torch.arange(T)[None, :])
    mask = torch.zeros(1, 1, T, T)
    mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return ids, pos, mask, loss


def naive_sft_nll(model, examples):
    import torch

    ids, pos, mask, loss = naive_pack_mask(examples)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -(logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * loss[:, 1:]).sum()


def naive_opd_loss(model, teacher_model, samples, loss_name):
    """A simple train_on_samples for one micro-batch: full logits, dense teacher distributions, and the
    teacher scoring first (its second forward)."""
    import torch

    from opd_runtime.distill import loss as L
    from opd_runtime.training.batches import right_pad, token_logprobs

    batch = right_pad([s.prompt_ids for s in samples], [s.completion_ids for s in samples], 0)
    with torch.no_grad():  # LocalTeacher.score, as it was
        t_logits = teacher_model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        teacher_lp_BT = token_logprobs(t_logits, batch.input_ids_BT)
        del t_logits
    old_lp_BT = torch.zeros_like(batch.loss_mask_BT)
    for i, s in enumerate(samples):
        old_lp_BT[i, len(s.prompt_ids) :] = torch.tensor(s.logprobs)
    mask = batch.loss_mask_BT
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    new_lp = token_logprobs(logits, batch.input_ids_BT)
    adv = L.advantages(old_lp_BT, teacher_lp_BT, mask)
    n = float(mask.sum())
    if loss_name == "full_forward_kl":
        with torch.no_grad():  # LocalTeacher.distributions, as it was
            t = teacher_model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
            teacher_BTV = torch.log_softmax(t.float(), dim=-1)
            del t
        loss = L.full_forward_kl_loss(logits, teacher_BTV, mask, n)
    else:
        loss = L.importance_sampling_loss(new_lp, old_lp_BT, adv, mask, n)
    L.masked_entropy_sum(logits.detach(), mask)  # the entropy metric, another full softmax
    return loss


def attention_case(new: bool, tokens: int):
    """One Qwen3 attention layer at the real widths on one packed row of 4 traces, forward and backward:
    the attention the stages pick (``sdpa_varlen``, no mask) against transformers' sdpa, which builds a
    T x T mask from the restarted position ids."""
    import torch
    from transformers import Qwen3Config
    from transformers.masking_utils import create_causal_mask
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

    from opd_runtime.training import attention

    cfg = Qwen3Config(**SHAPE)
    cfg._attn_implementation = attention.register() if new else "sdpa"
    gen = torch.Generator().manual_seed(0)
    layer = Qwen3Attention(cfg, 0).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    opt = ready_optimizer(layer)
    hidden_BTD = torch.randn(1, tokens, SHAPE["hidden_size"], generator=gen, requires_grad=True)
    pos_BT = (torch.arange(tokens) % (tokens // 4))[None]  # 4 traces, positions restart at each
    rope = Qwen3RotaryEmbedding(cfg)

    def loss_fn():
        mask = create_causal_mask(cfg, hidden_BTD, None, None, position_ids=pos_BT)
        out_BTD, _ = layer(hidden_BTD, rope(hidden_BTD, pos_BT), mask, position_ids=pos_BT)
        return out_BTD.sum()

    return opt, loss_fn  # the layer lives on in both


# --- one case, in this process ------------------------------------------------------------------------


def run_case(kind: str, path: str, tokens: int, samplers: list, limit: int, on_limit) -> dict:
    """Build the case, then run one step under a ``PeakSampler`` (appended to ``samplers``) that calls
    ``on_limit`` once resident memory passes ``limit``."""
    import torch

    from opd_runtime.training import activations, chunked

    new = path == "new"
    if kind == "head":
        model = random_model(0)
        head = model.lm_head
        del model.model.layers  # only the (tied) head and its embedding matter here
        opt = ready_optimizer(head)
        gen = torch.Generator().manual_seed(1)
        hidden = torch.randn(tokens, SHAPE["hidden_size"], generator=gen, requires_grad=True)
        targets = torch.randint(0, SHAPE["vocab_size"], (tokens,), generator=gen)

        def loss_fn():
            if new:
                return chunked.cross_entropy_sum(hidden, head, targets)
            return -torch.log_softmax(head(hidden).float(), -1).gather(-1, targets[:, None]).sum()
    elif kind == "headkl":
        model = random_model(0)
        head = model.lm_head
        del model.model.layers
        opt = ready_optimizer(head)
        teacher_head = random_model(1).lm_head.requires_grad_(False)
        gen = torch.Generator().manual_seed(1)
        hidden = torch.randn(tokens, SHAPE["hidden_size"], generator=gen, requires_grad=True)
        teacher_hidden = torch.randn(tokens, SHAPE["hidden_size"], generator=gen)
        targets = torch.randint(0, SHAPE["vocab_size"], (tokens,), generator=gen)

        def loss_fn():
            if new:
                rows = chunked.DenseTeacherRows(teacher_hidden, teacher_head)
                return chunked.token_terms(hidden, head, targets, entropy=True, kl="forward", teacher=rows).kl_N.sum()
            from opd_runtime.distill import loss as L

            with torch.no_grad():
                t_logp = torch.log_softmax(teacher_head(teacher_hidden).float(), -1)
            return L.dense_kl_per_token(torch.log_softmax(head(hidden).float(), -1), t_logp, "forward").sum()
    elif kind == "attn":
        opt, loss_fn = attention_case(new, tokens)
    else:
        model = random_model(0).train()
        if new:  # as the stages set it up: checkpointed layers, the mask-free attention (sdpa_varlen here)
            activations.use_gradient_checkpointing(model, True)
            activations.use_fast_attention(model)
        opt = ready_optimizer(model)
    if kind == "sft":
        examples = traces(tokens, 4, seed=1)
        n_loss = sum(len(c) for _, c in examples)

        def loss_fn():
            if new:
                from opd_runtime.sft.trainer import micro_batch_nll

                return micro_batch_nll(model, examples, packing=True, pad_id=0) / n_loss
            return naive_sft_nll(model, examples) / n_loss
    elif kind.startswith("opd"):
        from opd_runtime.distill.learner import train_on_samples
        from opd_runtime.distill.teacher import LocalTeacher
        from opd_runtime.generation import Sample
        from opd_runtime.spec import DistillSpec

        loss_name = "full_forward_kl" if kind == "opd-kl" else "importance_sampling"
        teacher_model = random_model(1).eval()
        if new:
            activations.use_fast_attention(teacher_model)
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        samples = [Sample(p, c, [-2.0] * len(c)) for p, c in traces(tokens, 8, seed=2)]

        def loss_fn():
            if not new:
                return naive_opd_loss(model, teacher_model, samples, loss_name)
            cfg = DistillSpec(
                prompts={"name": "tinymath"},
                prompts_per_step=8,
                samples_per_prompt=1,
                micro_batch_size=8,
                loss=loss_name,
            )
            teacher = LocalTeacher(teacher_model, micro_batch_size=8)
            teacher_lp = None if loss_name == "full_forward_kl" else teacher.score(samples)
            train_on_samples(model, samples, teacher_lp, cfg, 0, teacher)  # backward inside
            return None

    base = rss_bytes()
    with PeakSampler(limit=limit, on_limit=on_limit) as sampler:
        samplers.append(sampler)
        t0 = time.perf_counter()
        loss = loss_fn()
        if loss is not None:
            loss.backward()
        del loss
        backward_peak = sampler.peak
        opt.step()
    return {"base": base, "backward_peak": backward_peak, "peak": sampler.peak, "seconds": time.perf_counter() - t0}


def child(kind: str, path: str, tokens: int, limit_gib: float) -> None:
    """One case. Resident memory above ``limit_gib`` ends it as "OOM at X GiB" (sampled every 2 ms); an
    address-space limit 8 GiB higher backs that up for allocations faster than the sampler."""
    backstop = int((limit_gib + 8) * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (backstop, backstop))
    import torch

    torch.manual_seed(0)
    out = {"case": kind, "path": path, "tokens": tokens}
    status = f"OOM at {limit_gib:g} GiB"

    def over_limit(peak: int) -> None:
        print("RESULT " + json.dumps({**out, "status": status, "peak": peak, "process_peak": peak_bytes()}), flush=True)
        os._exit(0)

    samplers: list[PeakSampler] = []
    try:
        out.update(run_case(kind, path, tokens, samplers, int(limit_gib * GIB), over_limit))
        out["status"] = "ok"
    except (MemoryError, RuntimeError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        out["status"] = status + " (allocation refused)"
        out["peak"] = samplers[-1].peak if samplers else peak_bytes()
    out["process_peak"] = peak_bytes()
    print("RESULT " + json.dumps(out), flush=True)


def table(rows: list[dict]) -> str:
    lines = [
        "| case | tokens | path | peak RSS of the step (GiB) | weights+optimizer (GiB) "
        "| forward+backward above it (GiB) | seconds | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["status"] == "ok"
        base = f"{r['base'] / GIB:.2f}" if "base" in r else "-"
        above = f"{(r['backward_peak'] - r['base']) / GIB:.2f}" if ok else "-"
        peak = f"{r['peak'] / GIB:.2f}" if ok else f">{r['peak'] / GIB:.1f}"
        secs = f"{r['seconds']:.0f}" if ok else "-"
        lines.append(
            f"| {r['case']} | {r['tokens']} | {r['path']} | {peak} | {base} | {above} | {secs} | {r['status']} |"
        )
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[str]:
    by = {(r["case"], r["path"], r["tokens"]): r for r in rows if r["status"] == "ok"}
    out = []

    def above(key):
        return by[key]["backward_peak"] - by[key]["base"]

    if ("sft", "new", FULL) in by:
        peak = by[("sft", "new", FULL)]["peak"] / GIB
        out.append(
            f"SFT step on a packed {FULL}-token row: peak {peak:.2f} GiB (target <= 12): "
            + ("PASS" if peak <= 12 else "FAIL")
        )
    for kind in ("sft", "opd-kl", "opd-is"):
        for path in ("new", "naive"):
            a, b = (kind, path, FULL), (kind, path, QUARTER)
            if a in by and b in by:
                ratio = above(a) / above(b)
                out.append(
                    f"{kind} {path}: memory above weights+optimizer at {FULL} / at {QUARTER} tokens = "
                    f"{ratio:.2f} (target <= 4.5)"
                    + (": PASS" if path == "new" and ratio <= 4.5 else ": FAIL" if path == "new" else "")
                )
    for path in ("new", "naive"):
        a, b = ("head", path, 4096), ("head", path, 1024)
        if a in by and b in by:
            out.append(
                f"loss head alone, {path}: above at 4096 tokens (8 chunks of 512) / at 1024 (2 chunks) = "
                f"{above(a) / above(b):.2f}" + (" (flat: logits memory is one chunk)" if path == "new" else "")
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help="comma-separated KIND-PATH-TOKENS (default: the list above), e.g. sft-naive-1024")
    ap.add_argument("--limit-gib", type=float, default=14.0, help="resident-memory limit of each case")
    ap.add_argument("--results", help="append each case's result to this JSON-lines file as it finishes")
    ap.add_argument("--table-from", metavar="FILE", help="print the table of a --results file and exit")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.limit_gib)
        return
    if args.table_from:
        with open(args.table_from) as fh:
            rows = [json.loads(ln) for ln in fh if ln.strip()]
        print(table(rows))
        for line in checks(rows):
            print(line)
        return
    cases = CASES
    if args.cases:  # any KIND-PATH-TOKENS, e.g. a naive case at a size that fits
        cases = [(k, p, int(t)) for k, p, t in (c.rsplit("-", 2) for c in args.cases.split(","))]
    rows = []
    for kind, path, tokens in cases:
        name = f"{kind}-{path}-{tokens}"
        proc = subprocess.run(
            [sys.executable, __file__, "--child", kind, path, str(tokens), "--limit-gib", str(args.limit_gib)],
            capture_output=True,
            text=True,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:  # killed (e.g. by the kernel) or crashed: report it, keep going
            r = {
                "case": kind,
                "path": path,
                "tokens": tokens,
                "peak": 0,
                "status": f"failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
            }
        else:
            r = json.loads(line[len("RESULT ") :])
        rows.append(r)
        print(f"{name}: {r['status']}, peak {r['peak'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
        if args.results:
            with open(args.results, "a") as fh:
                fh.write(json.dumps(r) + "\n")
    print(table(rows))
    for line in checks(rows):
        print(line)


if __name__ == "__main__":
    main()
