"""Multi-node training stages on the real control plane (tests/support/controlplane; kwok plays the kubelet).

``resources.nodes: 2`` makes a stage an Indexed Job of two pods plus a headless Service for torchrun's
rendezvous on pod 0. Checked here: the objects and each pod's command and environment as the Job
controller creates them; the stage status counting the pods; one failed pod failing the attempt, the
other pod going with it, and the retry being a new gang with ``--resume``; a gang ending with pod 0's
result. Last, the command line of those real pods, run here as two CPU processes (gloo, one per
"node"), trains to the weights one process gets.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from opd_runtime.sft.trainer import run_sft
from opd_runtime.spec import parse_run

from support.numerics import ADAMW_WEIGHTS_REL
from support.operator_harness import INDEX, TIMEOUT, Run, exists, gang, sft_only
from support.processes import free_port, opd_env

BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT_S = 300


def flag(argv: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


def test_two_nodes_run_as_an_indexed_job_that_fails_retries_and_succeeds_as_one(cp, ns, operator, gpu_nodes):
    doc = sft_only("gang", {"resources": {"gpus": 4, "nodes": 2}}, retries=1, backoffSeconds=1, **gpu_nodes)
    run = Run(cp, ns, doc)
    run.wait("the sft Job", lambda st: (st.get("stages", {}).get("sft") or {}).get("job") == "gang-sft-1")
    job = cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/gang-sft-1")["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"], job["backoffLimit"]) == ("Indexed", 2, 2, 0)
    assert job["template"]["spec"]["subdomain"] == "gang-sft-ranks"
    svc = cp.get(f"/api/v1/namespaces/{ns}/services/gang-sft-ranks")["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["selector"] == {"opd.dev/run": "gang", "opd.dev/stage": "sft"}

    pods = gang(cp, ns, "gang-sft-1")
    assert len({p["spec"]["nodeName"] for p in pods}) == 2  # 4 GPUs a node: one pod each
    for index, pod in enumerate(pods):
        spec, container = pod["spec"], pod["spec"]["containers"][0]
        # The Job controller names each pod's host after its index, under the Service's subdomain ...
        assert (spec["hostname"], spec["subdomain"]) == (f"gang-sft-1-{index}", "gang-sft-ranks")
        # the index is a label too: the chart's PodMonitor scrapes pod 0 (rank 0) alone by it
        assert pod["metadata"]["labels"][INDEX] == str(index)
        # ... and gives it JOB_COMPLETION_INDEX, which the kubelet expands into --node-rank.
        env = {e["name"]: e for e in container["env"]}
        assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"].endswith(f"['{INDEX}']")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        argv = container["command"]
        assert argv[:3] == ["python3", "-m", "opd_runtime.launch"]
        assert flag(argv, "nnodes") == "2" and flag(argv, "nproc-per-node") == "4"
        assert flag(argv, "node-rank") == "$(JOB_COMPLETION_INDEX)"
        assert flag(argv, "master-addr") == f"gang-sft-1-0.gang-sft-ranks.{ns}.svc"
        assert argv[argv.index("--no-python") + 1 :][:2] == ["opd", "sft"] and "--resume" in argv
    st = run.wait("both pods ready", lambda st: (st["stages"]["sft"].get("ranks") or {}).get("ready") == 2)
    assert st["stages"]["sft"]["ranks"] == {"pods": 2, "processes": 8, "running": 2, "ready": 2}
    assert "(2/2 pods ready)" in st["message"]

    # One rank fails: the attempt fails, the Job controller takes the other pod down, a new gang resumes.
    cp.set_pod_exit(ns, pods[1]["metadata"]["name"], 1, '{"stage": "sft", "exit_code": 1, "error": "NCCL timeout"}')
    st = run.wait("the second attempt", lambda st: st["stages"]["sft"].get("job") == "gang-sft-2")
    assert st["stages"]["sft"]["failures"] == 1 and "NCCL timeout" in st["stages"]["sft"]["message"]
    retry = gang(cp, ns, "gang-sft-2")
    assert not [p for p in cp.pods(ns, "job-name=gang-sft-1") if p["status"].get("phase") == "Running"]
    for pod in retry:
        argv = pod["spec"]["containers"][0]["command"]
        assert "--resume" in argv and flag(argv, "master-addr") == f"gang-sft-2-0.gang-sft-ranks.{ns}.svc"

    # Rank 0 (pod 0) writes the stage's result; the other pod ends with an empty message.
    cp.set_pod_exit(ns, retry[1]["metadata"]["name"], 0, "")
    result = {"stage": "sft", "step": 400, "loss": 0.3, "checkpoint": "/workspace/checkpoints/sft/final"}
    cp.set_pod_exit(ns, retry[0]["metadata"]["name"], 0, json.dumps(result))
    st = run.wait("Succeeded", lambda st: st.get("phase") == "Succeeded")
    assert st["stages"]["sft"]["checkpoint"] == result["checkpoint"] and st["stages"]["sft"]["attempts"] == 2
    assert "ranks" not in st["stages"]["sft"]
    cp.wait(
        "the ranks Service to go",
        lambda: not exists(cp, f"/api/v1/namespaces/{ns}/services/gang-sft-ranks"),
        timeout=TIMEOUT,
    )


# ---- the pods' own command line, run here ------------------------------------------------------------


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """What the kubelet does to a container's command: ``$(NAME)`` becomes the variable's value."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a) for a in argv]


def test_the_pods_command_line_trains_two_processes_to_the_weights_of_one(cp, ns, operator, random_models, tmp_path):
    """sft on two one-process "nodes" (CPU pods) started with the command and environment of the two pods
    the Job controller created; only what a cluster provides is replaced: the mounts (/etc/opd/run.yaml
    holds the ConfigMap's run file, /workspace is one shared folder), pod 0's DNS name (127.0.0.1) and the
    programs' paths. LoRA, packed rows, 5 traces a step split 3 + 2 over the ranks."""
    sft = {
        "dataset": {"name": "tinymath", "maxSamples": 40},
        "steps": 3,
        "batchSize": 5,
        "microBatchSize": 2,
        "maxSeqLength": 128,
        "gradientCheckpointing": False,
        "optimizer": {"learningRate": 1e-2, "warmupSteps": 0, "schedule": "constant"},
        "checkpointing": {"every": 2, "keep": 2},
        "lora": {"enabled": True, "rank": 4, "alpha": 8.0},
        "resources": {"gpus": 0, "nodes": 2},
    }
    doc = sft_only("cpu-gang", sft)
    doc["spec"]["student"] = {"model": str(random_models.student), "dtype": "float32"}
    run = Run(cp, ns, doc)
    pods = gang(cp, ns, "cpu-gang-sft-1")
    run_file = yaml.safe_load(cp.get(f"/api/v1/namespaces/{ns}/configmaps/cpu-gang-spec")["data"]["run.yaml"])
    config, ws = tmp_path / "run.yaml", tmp_path / "workspace"
    config.write_text(yaml.safe_dump(run_file, sort_keys=False))
    port = str(free_port())
    procs, logs = [], []
    for index, pod in enumerate(pods):
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env["JOB_COMPLETION_INDEX"] = pod["metadata"]["annotations"][INDEX]  # the fieldRef's value
        env = {k: v.replace("/workspace", str(ws)) for k, v in env.items()}
        env["OPD_TERMINATION_LOG"] = str(tmp_path / f"termination-{index}")
        argv = expand(container["command"], env)
        host = flag(argv, "master-addr")
        argv = [
            a.replace("/etc/opd/run.yaml", str(config)).replace(host, "127.0.0.1").replace("=29500", f"={port}")
            for a in argv
        ]
        argv = [sys.executable if a == "python3" else str(BIN / "opd") if a == "opd" else a for a in argv]
        argv = [a if a != "/workspace" else str(ws) for a in argv]
        assert flag(argv, "node-rank") == str(index)
        logs.append(tmp_path / f"pod-{index}.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(argv, env={**opd_env(), **env}, stdout=out, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    one = tmp_path / "one"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # like the launched workers, so both sides reduce floats in the same order
    try:
        run_sft(parse_run(run_file), one, log=lambda *_: None)
    finally:
        torch.set_num_threads(before)
    a = load_file(str(one / "checkpoints" / "sft" / "final" / "model.safetensors"))
    b = load_file(str(ws / "checkpoints" / "sft" / "final" / "model.safetensors"))
    init = load_file(str(random_models.student / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    print(f"largest relative weight difference, 1 process vs the 2 pods' command: {worst:.2e} (moved {moved:.2e})")
    assert worst < ADAMW_WEIGHTS_REL and moved > 1e-3

    # Rank 0 wrote the result into pod 0's termination message; kwok ends the pods with what they wrote.
    files = [tmp_path / f"termination-{i}" for i in (0, 1)]
    messages = [f.read_text() if f.exists() else "" for f in files]
    assert json.loads(messages[0])["step"] == 3 and messages[1] == ""
    for pod, message in zip(pods, messages):
        cp.set_pod_exit(ns, pod["metadata"]["name"], 0, message)
    st = run.wait("Succeeded", lambda st: st.get("phase") == "Succeeded")
    assert (
        st["stages"]["sft"]["step"] == 3 and st["stages"]["sft"]["checkpoint"] == json.loads(messages[0])["checkpoint"]
    )
