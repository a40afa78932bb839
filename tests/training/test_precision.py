"""Mixed precision: float32 master weights and AdamW moments, bf16 compute (``training.precision``).

The point of master weights: an update smaller than half a bf16 unit in the last place rounds away when
the weights themselves are bf16, so a bf16-only model stops learning at small learning rates. The main
test trains the same model both ways on this CPU (CPU autocast in bf16 is the real thing) and shows it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from opd_runtime import modeling
from opd_runtime.spec import LoraSpec
from opd_runtime.training.loop import optimizer_step
from opd_runtime.training.model_setup import export_final
from opd_runtime.training.optim import build_optimizer
from opd_runtime.training.precision import FP32, Precision, attach, autocast_context, training_precision

MIXED_BF16 = Precision(master=torch.float32, frozen=torch.bfloat16, compute=torch.bfloat16, export=torch.bfloat16)
CPU = torch.device("cpu")


def test_policy_per_dtype_and_device():
    gpu = torch.device("cuda")  # only a name here: no GPU is needed to ask for the policy
    assert training_precision("bfloat16", gpu) == MIXED_BF16
    assert training_precision("auto", gpu) == MIXED_BF16
    fp16 = training_precision("float16", gpu)
    assert (fp16.master, fp16.compute, fp16.export) == (torch.float32, None, torch.float16) and not fp16.mixed
    assert training_precision("float32", gpu) == FP32
    for name in ("auto", "bfloat16", "float16", "float32"):  # CPU training is float32, as modeling decides
        assert training_precision(name, CPU) == FP32


def norm_weights(model) -> torch.Tensor:
    """All RMSNorm weights (initialised to exactly 1.0, where a bf16 ulp is 2^-7 below 1.0's 2^-8 gap)."""
    return torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if "norm" in n]).float()


def train(model, ids: torch.Tensor, steps: int, lr: float, on_step=None) -> None:
    optimizer, scheduler = build_optimizer(
        model.parameters(),
        lr=lr,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        schedule="constant",
        warmup_steps=0,
        total_steps=steps,
    )
    for step in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer_step(model, optimizer, scheduler, max_grad_norm=1.0)
        if on_step is not None:
            on_step(step + 1, optimizer)


@pytest.mark.cpu_kernels
def test_master_weights_learn_where_bf16_weights_cannot(random_models):
    """lr 1e-4: each AdamW update (about lr in size) is far below half the bf16 gap at 1.0 (2^-9 ~ 2e-3).

    bf16-only weights (the model dtype for weights and optimizer, no masters): the norm weights never
    move. Master weights: they move from the first step, while their bf16 view (what the bf16 compute
    sees) still reads 1.0; the updates accumulate until the bf16 view changes too.
    """
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 24))
    steps, lr = 50, 1e-4

    bf16_only = modeling.load_causal_lm(str(random_models.student), load_dtype=torch.bfloat16, dev=CPU)
    assert norm_weights(bf16_only).eq(1.0).all()
    train(bf16_only, ids, steps, lr)
    assert norm_weights(bf16_only).eq(1.0).all(), "bf16 weights moved: the test's premise is wrong"

    mixed = attach(
        modeling.load_causal_lm(str(random_models.student), load_dtype=torch.float32, dev=CPU), MIXED_BF16, CPU
    )
    seen: dict[int, tuple[float, float]] = {}

    def record(step: int, optimizer) -> None:
        w = norm_weights(mixed)
        seen[step] = (float((w != 1.0).float().mean()), float((w.bfloat16() != 1.0).float().mean()))
        if step == 1:  # AdamW's moments live in float32 next to the masters
            state = next(iter(optimizer.state.values()))
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32

    train(mixed, ids, steps, lr, on_step=record)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    moved_1, bf16_view_moved_1 = seen[1]
    _, bf16_view_moved_n = seen[steps]
    print(
        f"norm weights changed: masters {moved_1:.0%} after 1 step, bf16 view {bf16_view_moved_1:.0%} after 1 "
        f"step and {bf16_view_moved_n:.0%} after {steps}; bf16-only weights 0%"
    )
    # Not rounding tolerances but counts. AdamW's first update is lr * g / (|g| + eps): ~lr for every
    # weight with a non-zero gradient, on any kernel (a norm weight's gradient is never exactly 0 here)...
    assert moved_1 > 0.99  # every master moved at once...
    assert bf16_view_moved_1 == 0.0  # ...by less than bf16 can show (lr 1e-4 < 2^-9, half its gap below 1.0)...
    # ...and 50 updates of ~1e-4 cross that half gap (2e-3) where the gradient's sign holds for ~20 of them:
    # a share set by the data, not by rounding (the line printed above shows it)
    assert bf16_view_moved_n > 0.2  # ...and the sum of sub-ulp updates became visible


@pytest.mark.cpu_kernels
def test_forward_runs_in_bf16_with_float32_gradients(random_models):
    model = attach(
        modeling.load_causal_lm(str(random_models.student), load_dtype=torch.float32, dev=CPU), MIXED_BF16, CPU
    )
    ids = torch.randint(3, 200, (1, 12))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16  # the matmuls ran under autocast
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    # a loss applying the output head itself (outside forward, as training.chunked does) computes in
    # bf16 too, as does other code under autocast_context
    hidden = model.model(input_ids=ids).last_hidden_state
    assert model.lm_head(hidden).dtype == torch.bfloat16
    with autocast_context(model):
        assert model.model.layers[0].mlp.down_proj(torch.ones(1, 128)).dtype == torch.bfloat16
    assert model.model.layers[0].mlp.down_proj(torch.ones(1, 128)).dtype == torch.float32  # and not without


def test_lora_adapters_are_float32_over_a_bf16_base(random_models):
    from peft import LoraConfig, get_peft_model

    base = modeling.load_causal_lm(str(random_models.student), load_dtype=torch.bfloat16, dev=CPU)
    lora = LoraSpec(enabled=True, rank=4, alpha=8.0)
    model = attach(
        get_peft_model(
            base, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
        ),
        MIXED_BF16,
        CPU,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    ids = torch.randint(3, 200, (1, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_the_final_model_is_exported_in_the_spec_dtype(random_models, tmp_path):
    model = attach(
        modeling.load_causal_lm(str(random_models.student), load_dtype=torch.float32, dev=CPU), MIXED_BF16, CPU
    )
    tok = modeling.load_tokenizer(str(random_models.student))
    export_final(model, tok, tmp_path / "final", lora_enabled=False)
    weights = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the masters are untouched
    masters = dict(model.named_parameters())
    assert weights.keys() == masters.keys()  # the tied output head is not written twice
    for k, v in weights.items():
        assert torch.equal(v, masters[k].detach().bfloat16())
    reloaded = modeling.load_causal_lm(str(tmp_path / "final"), dtype="float32", dev=CPU)
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # config.json says what the files hold
    for k, v in reloaded.named_parameters():
        assert torch.equal(v.detach(), masters[k].detach().bfloat16().float())


@pytest.mark.parametrize("name", ["float32"])
def test_float32_runs_are_unchanged(random_models, name):
    model = attach(
        modeling.load_causal_lm(str(random_models.student), dtype=name, dev=CPU), training_precision(name, CPU), CPU
    )
    ids = torch.randint(3, 200, (1, 8))
    assert model(input_ids=ids).logits.dtype == torch.float32
    assert "forward" not in vars(model)  # no autocast wrapper was installed
