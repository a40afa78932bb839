"""The SFT stage: trace loaders, packing, loss on assistant tokens only, exact resume, output for OPD."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from opd_runtime import modeling
from opd_runtime.sft.packing import first_fit, pack
from opd_runtime.sft.traces import Trace, load_traces, tokenize
from opd_runtime.sft.trainer import micro_batch_nll, run_sft
from opd_runtime.spec import DatasetSpec, parse_run
from opd_runtime.training import activations
from opd_runtime.training.batches import length_groups
from opd_runtime.workspace import Workspace

from support.numerics import TINY_MODEL_REL, assert_close, normwise_error
from support.runs import sft_run


def test_openthoughts_and_chat_records_become_messages(tmp_path):
    ot = tmp_path / "ot.jsonl"
    ot.write_text(
        json.dumps(
            {
                "conversations": [
                    {"from": "human", "value": "1+1?"},
                    {"from": "gpt", "value": "<think>\n1+1=2\n</think>\n\n\\boxed{2}"},
                ]
            }
        )
        + "\n"
        + json.dumps({"conversations": [{"from": "human", "value": "no answer"}]})
        + "\n"
    )
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {
                "id": "c1",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                ],
            }
        )
        + "\n"
    )
    traces = list(load_traces(DatasetSpec(path=str(ot), format="openthoughts")))
    assert [m["role"] for m in traces[0].messages] == ["user", "assistant"]
    assert len(traces) == 1  # the record without an assistant turn has nothing to learn
    (c,) = load_traces(DatasetSpec(path=str(chat)))
    assert c.id == "c1" and [m["role"] for m in c.messages] == ["system", "user", "assistant"]
    tm = list(load_traces(DatasetSpec(name="tinymath", maxSamples=3)))
    assert len(tm) == 3 and "\\boxed{" in tm[0].messages[-1]["content"]


def test_loss_covers_only_the_assistant_answer(random_models):
    tok = modeling.load_tokenizer(str(random_models.tokenizer))
    trace = Trace(
        "t",
        [
            {"role": "user", "content": "Start with 2, add 3."},
            {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\n\\boxed{5}"},
        ],
    )
    prompt, completion = tokenize(tok, trace, 512)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(completion) == trace.messages[-1]["content"] + "<|im_end|>"
    p2, c2 = tokenize(tok, trace, len(prompt) + 3)
    assert p2 == prompt and c2 == completion[:3]  # truncation cuts the answer, never the prompt


def test_first_fit_respects_capacity():
    rows = first_fit([5, 4, 3, 3, 2, 7], capacity=8)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([5, 4, 3, 3, 2, 7][i] for i in r) <= 8 for r in rows)


LENGTHS = [40, 3, 17, 17, 90, 5, 33, 8, 61, 2, 12, 25]
# Packed and padded rows, sdpa and our varlen attention, one micro-batch or several: the same sums in
# another order. A trace that saw another one (a missing restart) differs by O(1), far above the bound.
WHY = "the tiny models' float32 sums in another order"


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("budget", [None, 64, 100])
def test_token_budget_micro_batches(packed, budget):
    groups = length_groups(LENGTHS, max_count=4, max_tokens=budget, packed=packed)
    assert sorted(i for g in groups for i in g) == list(range(len(LENGTHS)))  # each exactly once
    for g in groups:
        assert 1 <= len(g) <= 4
        cost = sum(LENGTHS[i] for i in g) if packed else max(LENGTHS[i] for i in g) * len(g)
        if budget is not None and len(g) > 1:
            assert cost <= budget, (g, cost)
    if budget == 64:  # the 90-token sequence exceeds the budget and sits alone
        assert [4] in groups
    if not packed:  # grouped longest first: a micro-batch never mixes lengths around another's
        spans = [(min(LENGTHS[i] for i in g), max(LENGTHS[i] for i in g)) for g in groups]
        assert all(hi_b <= lo_a for (lo_a, _), (_, hi_b) in itertools.pairwise(spans))
    if budget is None:  # the count cap alone: 12 sequences, 4 per micro-batch
        assert len(groups) == 3


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("attn", ["sdpa", "sdpa_varlen"])
def test_packed_rows_compute_what_separate_traces_compute(random_models, attn):
    """Both CPU attentions: transformers' sdpa (a block-diagonal mask from the restarts) and ours (one sdpa
    call per trace, no mask), the one ``use_fast_attention`` picks here."""
    model = modeling.load_causal_lm(str(random_models.teacher), dtype="float32").eval()
    if attn == "sdpa_varlen":
        assert activations.use_fast_attention(model) == "sdpa_varlen"
    assert model.config._attn_implementation == attn
    examples = [([1, 5, 9, 2], [7, 8, 2]), ([1, 4], [6, 6, 6, 2]), ([1, 3, 3, 3, 3], [2])]
    capacity = 13  # two traces share a row, the third sits in a padded row of its own
    rows = pack(examples, capacity=capacity, pad_id=0)
    assert not hasattr(rows, "attention_mask_B1TT")  # no O(T^2) mask is built: only restarted positions
    layout = first_fit([len(p) + len(c) for p, c in examples], capacity)
    assert rows.input_ids_BT.shape[0] == len(layout) == 2
    with torch.no_grad():
        # what the SFT stage passes: position ids, no attention mask, no cache
        packed = model(input_ids=rows.input_ids_BT, position_ids=rows.position_ids_BT, use_cache=False).logits
        # the same row with running positions (no restarts): the traces see each other, so the check can fail
        mixed = model(input_ids=rows.input_ids_BT, use_cache=False).logits
        for b, row in enumerate(layout):
            at = 0
            for k, i in enumerate(row):
                p, c = examples[i]
                alone = model(input_ids=torch.tensor([p + c])).logits[0]
                span = slice(at, at + len(p) + len(c))
                assert_close(packed[b, span], alone, rel=TINY_MODEL_REL, why=WHY, what=f"row {b}, trace {i}")
                if k > 0:
                    assert normwise_error(mixed[b, span], alone) > 100 * TINY_MODEL_REL
                at += len(p) + len(c)
    # the SFT loss: one packed row == one padded row per trace, values and gradients
    model.train()
    grads = {}
    for packing in (True, False):
        model.zero_grad(set_to_none=True)
        nll = micro_batch_nll(model, examples, packing=packing, pad_id=0)
        nll.backward()
        grads[packing] = (nll.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert_close(grads[True][0], grads[False][0], rel=TINY_MODEL_REL, why=WHY, what="NLL")
    for n, g in grads[True][1].items():
        assert_close(g, grads[False][1][n], rel=TINY_MODEL_REL, why=WHY, what=n)
    model.zero_grad(set_to_none=True)


def gqa_model(random_models, seed: int = 3):
    """A tiny Qwen3 with grouped-query attention (4 query heads share 2 key/value heads), as Qwen3 has."""
    from opd_runtime.tiny_models import ModelShape, new_model

    tok = modeling.load_tokenizer(str(random_models.tokenizer))
    shape = ModelShape(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        head_dim=16,
    )
    return new_model(shape, tok, seed).float()


@pytest.mark.cpu_kernels
def test_varlen_attention_equals_sdpa_on_packed_rows_values_and_gradients(random_models):
    """sdpa_varlen (per-trace sdpa, GQA, no mask) == transformers' sdpa with its block-diagonal mask, on
    the SFT loss of packed rows with gradient checkpointing on: the loss and every parameter's gradient."""
    from transformers.masking_utils import create_causal_mask

    gen = torch.Generator().manual_seed(0)
    examples = [
        (
            [1, *torch.randint(3, 60, (n % 5 + 1,), generator=gen).tolist()],
            torch.randint(3, 60, (n,), generator=gen).tolist(),
        )
        for n in (9, 4, 13, 1, 6)
    ]
    results = {}
    for attn in ("sdpa", "sdpa_varlen"):
        model = gqa_model(random_models).train()
        activations.use_gradient_checkpointing(model, True)
        model.set_attn_implementation("sdpa")
        if attn == "sdpa_varlen":
            assert activations.use_fast_attention(model) == attn
        rows = pack(examples, capacity=24, pad_id=0)
        assert rows.input_ids_BT.shape[0] == 3  # three packed rows, two of them padded
        embeds_BTD = model.model.embed_tokens(rows.input_ids_BT)
        mask = create_causal_mask(model.config, embeds_BTD, None, None, position_ids=rows.position_ids_BT)
        # sdpa's mask is (B, 1, T, T); ours is none at all
        assert (mask is None) == (attn == "sdpa_varlen")
        # the stage's loss (all traces in one row), and the rows above through the logits
        nll = micro_batch_nll(model, examples, packing=True, pad_id=0)
        logits_BTV = model(input_ids=rows.input_ids_BT, position_ids=rows.position_ids_BT, use_cache=False).logits
        logp_BT = torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, rows.input_ids_BT[:, 1:, None])[..., 0]
        nll = nll - (logp_BT * rows.loss_mask_BT[:, 1:]).sum()
        nll.backward()
        results[attn] = (nll.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert_close(results["sdpa_varlen"][0], results["sdpa"][0], rel=TINY_MODEL_REL, why=WHY, what="NLL")
    for n, g in results["sdpa"][1].items():
        assert_close(results["sdpa_varlen"][1][n], g, rel=TINY_MODEL_REL, why=WHY, what=n)


@pytest.mark.cpu_kernels
def test_varlen_attention_leaves_padding_masks_and_cached_decoding_to_sdpa(random_models):
    """Left-padded rows with a 2D mask (as generate passes them) and greedy decoding with a cache give
    what sdpa gives: the padding mask is honoured, not dropped."""
    model = gqa_model(random_models).eval()
    ids_BT = torch.tensor([[0, 0, 5, 9, 7], [4, 8, 6, 6, 2]])
    mask_BT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = {}
    with torch.no_grad():
        for attn in ("sdpa", "sdpa_varlen"):
            if attn == "sdpa_varlen":
                activations.use_fast_attention(model)
            assert model.config._attn_implementation == attn
            logits = model(input_ids=ids_BT, attention_mask=mask_BT).logits
            tokens = model.generate(
                input_ids=ids_BT, attention_mask=mask_BT, max_new_tokens=6, do_sample=False, pad_token_id=0
            )
            out[attn] = (logits, tokens)
    assert_close(out["sdpa_varlen"][0], out["sdpa"][0], rel=TINY_MODEL_REL, why=WHY, what="logits")
    assert torch.equal(out["sdpa_varlen"][1], out["sdpa"][1])
    # the check can fail: without its mask, row 0 would attend to its two padding tokens
    unmasked = model(input_ids=ids_BT).logits
    assert normwise_error(unmasked[0, 2:], out["sdpa"][0][0, 2:]) > 100 * TINY_MODEL_REL


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("packing", [True, False])
def test_token_budget_leaves_the_step_loss_unchanged(random_models, packing):
    """The step's summed NLL and gradients over token-budget micro-batches equal those of count-based ones."""
    from opd_runtime.sft.trainer import micro_batches
    from opd_runtime.spec.stages import SftSpec

    model = modeling.load_causal_lm(str(random_models.student), dtype="float32").train()
    gen = torch.Generator().manual_seed(0)
    examples = [
        (
            [1, *torch.randint(3, 60, (int(n) % 7 + 1,), generator=gen).tolist()],
            [*torch.randint(3, 60, (int(n),), generator=gen).tolist(), 2],
        )
        for n in torch.randint(1, 40, (10,), generator=gen)
    ]
    results = []
    for budget in (None, 48):
        cfg = SftSpec(
            dataset={"name": "tinymath"}, micro_batch_size=4, max_tokens_per_micro_batch=budget, packing=packing
        )
        groups = micro_batches(examples, cfg)
        assert (len(groups) == 3) == (budget is None)
        model.zero_grad(set_to_none=True)
        total = 0.0
        for g in groups:
            nll = micro_batch_nll(model, [examples[i] for i in g], packing=packing, pad_id=0)
            nll.backward()
            total += nll.item()
        results.append((total, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_close(results[0][0], results[1][0], rel=TINY_MODEL_REL, why=WHY, what="NLL")
    for n, g in results[0][1].items():
        assert_close(g, results[1][1][n], rel=TINY_MODEL_REL, why=WHY, what=n)


class Stop(Exception):
    pass


def test_sft_resumes_exactly_and_feeds_the_distill_stage(random_models, tmp_path):
    doc = sft_run(random_models.student, {"name": "tinymath", "maxSamples": 40})
    run = parse_run(doc)
    straight = tmp_path / "straight"
    run_sft(run, straight, log=lambda *_: None)

    def stop_after_3(rec):
        if rec["step"] == 3:
            raise Stop()

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Stop):
        run_sft(run, interrupted, log=lambda *_: None, on_step=stop_after_3)
    run_sft(run, interrupted, resume=True, log=lambda *_: None)
    a = load_file(str(straight / "checkpoints/sft/final/model.safetensors"))
    b = load_file(str(interrupted / "checkpoints/sft/final/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in (interrupted / "metrics/sft.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    result = json.loads((straight / "results/sft.json").read_text())
    assert result["loss_last"] < result["loss_first"]

    # the distill stage of the same run starts from the SFT output without being told where it is
    from opd_runtime.distill.learner import init_model_path

    doc["spec"]["distill"] = {"prompts": {"name": "tinymath"}, "steps": 1}
    assert init_model_path(parse_run(doc), Workspace(straight)) == str(straight / "checkpoints/sft/final")
    assert modeling.load_causal_lm(str(straight / "checkpoints/sft/final"), dtype="float32") is not None


def test_trace_store_reads_back_every_trace_by_index_from_disk(tmp_path):
    from opd_runtime.sft.trace_store import TraceStore, store_path, write_store
    from opd_runtime.sft.traces import load_traces
    from opd_runtime.spec.models import DatasetSpec

    spec = DatasetSpec(name="tinymath", max_samples=50)
    path = store_path(spec, tmp_path)
    assert write_store(load_traces(spec, tmp_path), path) == 50
    assert not list(path.parent.glob(".*tmp*"))  # written atomically
    expected = list(load_traces(spec, tmp_path))
    store = TraceStore(path)
    assert len(store) == 50
    assert [store[i] for i in (49, 0, 17)] == [expected[49], expected[0], expected[17]]
    assert store[-1] == expected[-1] and store[10:12] == expected[10:12]
    # another dataset section gets its own file; the same one maps to the same file
    assert store_path(DatasetSpec(name="tinymath", max_samples=51), tmp_path) != path
    assert store_path(DatasetSpec(name="tinymath", max_samples=50), tmp_path) == path
