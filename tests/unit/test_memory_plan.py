"""The memory plan (opd_runtime.memory_plan): its arithmetic on known shapes, the runs it refuses and why,
and `opd plan` / `opd validate` on the command line. Pure: no torch, no GPU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from opd_runtime import cli, memory_plan
from opd_runtime.memory_plan import FAMILIES, TrainingCase, model_shape, training_phases
from opd_runtime.plan import planned_stages
from opd_runtime.spec import SpecError, parse_run
from opd_runtime.spec.gpus import GIB, MIB

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qwen3-1.7b-aime.yaml"
QWEN3_1_7B, QWEN3_8B = FAMILIES["Qwen3-1.7B"], FAMILIES["Qwen3-8B"]


def example(change=None):
    doc = yaml.safe_load(EXAMPLE.read_text())
    if change is not None:
        change(doc["spec"])
    return parse_run(doc)


def plans(run):
    return {p.stage: p for p in memory_plan.plan(run, planned_stages(run))}


def part(phase, name: str) -> int:
    return next(p.bytes for p in phase.parts if p.name == name)


def test_parameter_counts_match_the_published_totals():
    # Qwen3-0.6B: 151,936 x 1,024 tied embeddings (155,582,464) + 28 layers x 15,730,944 + the final norm
    # (1,024) = 596,049,920, the published count exactly
    assert FAMILIES["Qwen3-0.6B"].params == 596_049_920
    # Qwen3-1.7B: 311,164,928 embeddings + 28 x 50,336,000 (attention 12,582,912, q/k norms 256, MLP
    # 37,748,736, norms 4,096) + 2,048 = 1,720,574,976 ("1.7B", of which 1.4B non-embedding)
    assert QWEN3_1_7B.params == 1_720_574_976
    # Qwen3-8B has an untied head: 2 x 622,329,856 + 36 x 192,946,432 + 4,096 = 8,190,735,360 ("8.2B")
    assert QWEN3_8B.params == 8_190_735_360
    assert model_shape("Qwen/Qwen3-1.7B-Base") == QWEN3_1_7B  # the -Base models share the shapes


def test_kv_cache_bytes_per_token():
    # 2 (K and V) x 36 layers x 8 KV heads x 128 x 2 bytes (bf16) = 147,456
    assert QWEN3_8B.kv_bytes_per_token() == 147_456
    assert QWEN3_1_7B.kv_bytes_per_token() == 2 * 28 * 8 * 128 * 2


def test_full_fine_tuning_is_16_bytes_per_parameter_and_fsdp_divides_it():
    case = TrainingCase(QWEN3_8B, tokens=8192, longest=8192)
    train = training_phases(case)[0]
    # fp32 masters 4 + gradients 4 + AdamW moments 8 bytes per parameter: 8.19e9 x 16 = 122.05 GiB
    states = part(train, "weights") + part(train, "gradients") + part(train, "AdamW moments")
    assert states == 16 * QWEN3_8B.params
    assert states / GIB == pytest.approx(122.05, abs=0.005)
    sharded = training_phases(TrainingCase(QWEN3_8B, tokens=8192, longest=8192, world=8, strategy="fsdp"))[0]
    assert part(sharded, "AdamW moments") == 8 * (QWEN3_8B.params // 8)
    ddp = training_phases(TrainingCase(QWEN3_8B, tokens=8192, longest=8192, world=8, strategy="ddp"))[0]
    assert part(ddp, "AdamW moments") == 8 * QWEN3_8B.params  # DDP: a whole copy on every process


def test_lora_keeps_only_adapter_state_and_a_bf16_base():
    case = TrainingCase(QWEN3_1_7B, tokens=4096, longest=4096, lora_rank=128)
    train = training_phases(case)[0]
    # rank 128 over q,k,v,o,gate,up,down: 128 x (4096 + 3072 + 3072 + 4096 + 8192 + 8192 + 8192) x 28 layers
    adapters = 128 * 38_912 * 28
    assert QWEN3_1_7B.lora_params(128, ["all-linear"]) == adapters
    assert part(train, "AdamW moments") == 8 * adapters
    assert part(train, "weights") == 2 * QWEN3_1_7B.params + 4 * adapters


def test_activations_grow_with_tokens_and_checkpointing_keeps_one_layer():
    small, big = (training_phases(TrainingCase(QWEN3_1_7B, tokens=n, longest=n))[0] for n in (4096, 16384))
    assert part(big, "recomputed layer") == 4 * part(small, "recomputed layer")
    # bf16 under autocast, fp32 residual stream: per token 2 x 2048 x 10 + 2048 x 12 + 1024 x 10 + 8 x 6144
    assert part(small, "recomputed layer") == 4096 * (40_960 + 24_576 + 10_240 + 49_152)
    no_ckpt = training_phases(TrainingCase(QWEN3_1_7B, tokens=4096, longest=4096, gradient_checkpointing=False))[0]
    assert part(no_ckpt, "layer activations") == 28 * part(small, "recomputed layer")


def test_float32_compute_on_a_gpu_takes_the_math_attention_and_bf16_does_not():
    fp32 = TrainingCase(QWEN3_1_7B, tokens=16384, longest=16384, dtype="float32")
    # 3 x 16 heads x 16,384^2 x 4 bytes = 48 GiB (+ the T x T causal mask)
    attn = part(training_phases(fp32)[0], "attention matrix (math sdpa)")
    assert attn == 3 * 16 * 16384**2 * 4 + 5 * 16384**2
    bf16 = training_phases(TrainingCase(QWEN3_1_7B, tokens=16384, longest=16384))[0]
    assert all(p.name != "attention matrix (math sdpa)" for p in bf16.parts)
    # float16 trains its fp32 masters without autocast: the same math path; on a CPU sdpa needs no T x T
    assert memory_plan.math_attention(TrainingCase(QWEN3_1_7B, tokens=1, longest=1, dtype="float16"))
    assert not memory_plan.math_attention(TrainingCase(QWEN3_1_7B, tokens=1, longest=1, device="cpu"))


def test_the_example_fits_and_its_table_names_every_stage():
    p = plans(example())
    assert set(p) == {"sft", "teacher", "distill", "eval"}
    assert all(x.fits for x in p.values())
    # distill peaks while the sampler's engine (0.5 of the GPU) is awake beside the LoRA trainer
    distill = p["distill"]
    assert distill.peak.name == "sampling (vLLM awake)"
    assert part(distill.peak, "sampler (vLLM share)") == int(0.5 * 81_559 * MIB)
    assert not p["sft"].gpu.stated and "assumed" in "\n".join(p["sft"].lines())


def test_refused_qwen3_8b_full_fine_tune_beside_the_vllm_sampler_which_forces_ddp():
    def change(spec):
        spec["student"]["model"] = "Qwen/Qwen3-8B-Base"
        spec["distill"]["lora"]["enabled"] = False

    distill = plans(example(change))["distill"]
    message = distill.refusal()
    assert message is not None and "ddp over 8" in "\n".join(distill.lines())
    # 122 GiB of weights, gradients and moments on every GPU, plus AdamW's step temporaries
    assert "153.6 GiB" in message and "spec.distill.sampler.backend: hf" in message
    assert "80 GB assumed" in message


def test_refused_float16_full_fine_tune_whose_attention_falls_to_the_math_kernel():
    def change(spec):
        spec["student"]["dtype"] = "float16"
        spec["sft"]["lora"]["enabled"] = False
        spec["sft"]["resources"]["gpus"] = 1

    sft = plans(example(change))["sft"]
    message = sft.refusal()
    assert message is not None
    assert "attention matrix (math sdpa) 49.2 GiB" in message
    assert message.index("spec.student.dtype: bfloat16") < message.index("spec.sft.lora.enabled")

    def bf16(spec):
        change(spec)
        spec["student"]["dtype"] = "bfloat16"

    assert plans(example(bf16))["sft"].fits  # the same run in bf16: flash attention, no T x T


def test_local_qwen3_8b_teacher_beside_a_full_fine_tune_and_the_sampler():
    """The review's first case: at gpuMemoryUtilization 0.5 on an 80 GB H100 it is predicted at 95% of
    the card (tight, not refused: the plan is no more exact than that); on an A100-40GB or with a larger
    sampler share it is refused, naming the teacher backend among the fixes."""

    def change(spec, util=0.5, gpu=None):
        spec["teacher"]["backend"] = "local"
        spec["distill"]["lora"]["enabled"] = False
        spec["distill"]["sampler"]["gpuMemoryUtilization"] = util
        if gpu:
            spec["distill"]["resources"]["gpuType"] = gpu

    at_half = plans(example(change))["distill"]
    assert at_half.fits and "tight" in "\n".join(at_half.lines())
    # fp32 masters 6.4 + moments 12.8 + teacher 15.3 + context 1.0 + 0.5 x 79.6 GiB
    assert at_half.peak.bytes / GIB == pytest.approx(75.3, abs=0.05)
    refused = plans(example(lambda s: change(s, util=0.6)))["distill"].refusal()
    assert refused is not None and "sampling (vLLM awake)" in refused
    assert refused.index("spec.distill.sampler.gpuMemoryUtilization") < refused.index("spec.teacher.backend")
    assert not plans(example(lambda s: change(s, gpu="A100-40GB")))["distill"].fits


def test_a_vllm_engine_whose_share_holds_no_sequence_is_refused():
    def change(spec):
        spec["teacher"]["serving"]["gpuMemoryUtilization"] = 0.2  # 15.9 GiB for 15.3 GiB of weights
        spec["eval"]["resources"]["gpuType"] = "L40S"

    p = plans(example(change))
    assert "fewer than one sequence of 20,480" in p["teacher"].refusal()
    assert p["eval"].fits and p["eval"].gpu.name == "L40S"


def test_gpu_memory_overrides_the_type_and_an_unknown_type_is_a_spec_error():
    run = example(lambda s: s["sft"]["resources"].update(gpuType="H200", gpuMemory="40Gi"))
    assert plans(run)["sft"].gpu.bytes == 40 * GIB
    with pytest.raises(SpecError, match="gpuType 'B300' is not one of H100, H200"):
        example(lambda s: s["sft"]["resources"].update(gpuType="B300"))


def test_unknown_models_and_cpu_stages_are_not_predicted(tmp_path):
    run = example(lambda s: s["student"].update(model="tiny://student"))
    sft = plans(run)["sft"]
    assert sft.fits and sft.peak is None and "no shape known for tiny://student" in sft.notes[0]
    model = tmp_path / "m"
    model.mkdir()
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    (model / "config.json").write_text(json.dumps({**cfg, "vocab_size": 500, "tie_word_embeddings": True}))
    shape = model_shape("m", root=tmp_path)
    assert shape is not None and (shape.kv_heads, shape.head_dim) == (4, 16)


def write(tmp_path: Path, change) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    change(doc["spec"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(doc)))
    return path


def test_opd_plan_prints_the_table_and_validate_refuses_with_exit_2(tmp_path, capsys):
    assert cli.main(["plan", "--config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "distill: 8 GPU(s) per pod, H100 (79.6 GiB), assumed" in out and "<- peak" in out

    def too_big(spec):
        spec["student"]["model"] = "Qwen/Qwen3-8B-Base"
        spec["distill"]["lora"]["enabled"] = False

    path = write(tmp_path, too_big)
    assert cli.main(["plan", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out
    assert "error: spec.distill: memory plan" in captured.err and "Change: " in captured.err
    assert cli.main(["validate", "--config", str(path)]) == 2
    assert "memory plan: distill: peak 153.6 GiB" in capsys.readouterr().out
    assert cli.main(["validate", "--config", str(EXAMPLE)]) == 0
