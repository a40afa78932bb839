"""The ``vllm-server`` teacher backend: scoring sampled tokens against a vLLM server over HTTP.

Each sequence (prompt + sampled completion, as token ids) goes to ``/v1/completions`` as a prompt with
``max_tokens: 1`` and ``prompt_logprobs: k``. The answer's ``choices[i].prompt_logprobs`` is a list whose
first item is null, then one ``{token_id: {logprob, rank, decoded_token}}`` per prompt token: the actual
token's log-prob, plus the k most likely tokens at that position when k > 0. ``score`` returns the
completion tokens' log-probs; with k > 0 (the full-distribution losses) the top-k lists are kept for
``distributions``, which the loss reads one micro-batch later, so every sequence crosses the network once
a step.

Sequences are packed into requests of at most ``maxBatchTokens`` tokens (a longer sequence goes alone),
with ``maxConcurrentRequests`` requests in flight. Connection failures, timeouts and 5xx/429 answers are
retried with exponential backoff for up to ``retrySeconds``, then ``TeacherUnavailable`` is raised; other
4xx answers (a sequence longer than the server's max-model-len, say) fail at once with the server's message.
Only the standard library is used (urllib and a thread pool).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..generation import Sample
from .loss import TopKLogprobs

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
REQUEST_TIMEOUT_S = 600.0  # one scoring request (a full token budget on a busy server)
RETRY_STATUS = {429, 500, 502, 503, 504}


class TeacherUnavailable(RuntimeError):
    """The teacher server did not answer within the retry budget (transient: the stage may be retried)."""


class TeacherRequestError(RuntimeError):
    """The teacher server refused a request (4xx): retrying the same request cannot help."""


@dataclass
class _TopK:
    """Per-position top-k of one sequence: row j is the distribution over token j (row 0 is unused)."""

    ids_LK: np.ndarray  # int64, -1 where padding
    logprobs_LK: np.ndarray  # float32


def _entry(position: dict | None, token: int) -> dict:
    """The server's prompt-logprob entry for ``token`` at one position (position 0 has none)."""
    if position is None or str(token) not in position:
        raise TeacherRequestError(f"teacher returned no log-prob for token {token}")
    return position[str(token)]


class ServerTeacher:
    # ``score`` fetches the top-k lists together with the sampled tokens' log-probs (one request per
    # batch), and ``kl_targets`` answers from them: the learner calls both
    scores_from_kl_targets = False

    def __init__(
        self,
        url: str,
        *,
        top_logprobs: int = 0,
        max_batch_tokens: int = 65536,
        max_concurrent_requests: int = 16,
        retry_seconds: float = 600.0,
        request_timeout: float = REQUEST_TIMEOUT_S,
        log: Callable[[str], None] | None = None,
        api_key: str | None = None,
    ):
        """``api_key``: sent as ``Authorization: Bearer`` (a server started with vLLM's --api-key)."""
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.top_logprobs = top_logprobs
        self.max_batch_tokens = max_batch_tokens
        self.max_concurrent_requests = max_concurrent_requests
        self.retry_seconds = retry_seconds
        self.request_timeout = request_timeout
        self.log = log
        self._model: str | None = None
        self._lock = threading.Lock()
        self._topk: dict[tuple[int, ...], _TopK] = {}
        self.requests_sent = 0  # HTTP requests that got an answer (for tests and logs)
        self.retries = 0

    # --- HTTP ------------------------------------------------------------------------------------------

    def _call(self, path: str, payload: dict | None = None) -> dict:
        """GET (no payload) or POST JSON, retrying transient failures until ``retry_seconds`` have passed."""
        url = f"{self.url}{path}"
        data = None if payload is None else json.dumps(payload).encode()
        first_failure: float | None = None
        delay = BACKOFF_START_S
        while True:
            req = urllib.request.Request(url, data=data, headers=self.headers)
            try:
                with urllib.request.urlopen(req, timeout=self.request_timeout) as resp:
                    body = resp.read()
                with self._lock:
                    self.requests_sent += 1
                return json.loads(body)
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:2000]
                if err.code not in RETRY_STATUS:
                    raise TeacherRequestError(
                        f"teacher at {self.url} refused {path} (HTTP {err.code}): {detail}"
                    ) from None
                error = f"HTTP {err.code}: {detail[:300]}"
            except (urllib.error.URLError, OSError) as err:  # refused, reset, DNS, timeout
                error = str(getattr(err, "reason", err))
            now = time.monotonic()
            first_failure = first_failure or now
            if now - first_failure > self.retry_seconds:
                raise TeacherUnavailable(
                    f"teacher at {self.url} did not answer {path} for {now - first_failure:.0f} s "
                    f"(spec.teacher.serving.retrySeconds = {self.retry_seconds:g}); last error: {error}. "
                    "Is `opd serve-teacher` running and is spec.teacher.serving.url (or --teacher-url) right?"
                )
            with self._lock:
                self.retries += 1
            if self.log and delay == BACKOFF_START_S:
                self.log(f"teacher at {self.url} not answering ({error}); retrying for up to {self.retry_seconds:g} s")
            time.sleep(min(delay, max(0.0, first_failure + self.retry_seconds - now) + 0.01))
            delay = min(delay * 2, BACKOFF_MAX_S)

    def model(self) -> str:
        """The served model's name (``/v1/models``), asked once."""
        if self._model is None:
            data = self._call("/v1/models").get("data") or []
            if not data:
                raise TeacherRequestError(f"teacher at {self.url} serves no model (/v1/models is empty)")
            self._model = data[0]["id"]
        return self._model

    def _prompt_logprobs(self, sequences: Sequence[Sequence[int]], k: int) -> list[list[dict | None]]:
        answer = self._call(
            "/v1/completions",
            {
                "model": self.model(),
                "prompt": [list(map(int, s)) for s in sequences],
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": k,
            },
        )
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        if len(choices) != len(sequences):
            raise TeacherRequestError(
                f"teacher at {self.url} answered {len(choices)} choices for {len(sequences)} prompts"
            )
        return [c["prompt_logprobs"] for c in choices]

    def _batches(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices of ``sequences`` grouped into requests of at most ``max_batch_tokens`` tokens."""
        groups: list[list[int]] = []
        tokens = 0
        for i, s in enumerate(sequences):
            if groups and tokens + len(s) <= self.max_batch_tokens:
                groups[-1].append(i)
                tokens += len(s)
            else:
                groups.append([i])
                tokens = len(s)
        return groups

    def _fetch(self, sequences: Sequence[Sequence[int]], k: int) -> list[list[dict | None]]:
        """prompt_logprobs of every sequence, in order, over concurrent batched requests."""
        self.model()  # once, before the threads start (and the first place a down server is waited for)
        groups = self._batches(sequences)
        out: list[list[dict | None] | None] = [None] * len(sequences)

        def run(group: list[int]) -> None:
            for i, lps in zip(group, self._prompt_logprobs([sequences[i] for i in group], k)):
                out[i] = lps

        workers = max(1, min(self.max_concurrent_requests, len(groups)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for f in [pool.submit(run, g) for g in groups]:
                f.result()
        return out  # type: ignore[return-value]

    # --- the Teacher interface -------------------------------------------------------------------------

    def score(self, samples: Sequence[Sample]) -> list[list[float]]:
        """The teacher's log-prob of every completion token of every sample."""
        sequences = [list(s.prompt_ids) + list(s.completion_ids) for s in samples]
        answers = self._fetch(sequences, self.top_logprobs)
        self._topk = {}
        out: list[list[float]] = []
        for s, seq, lps in zip(samples, sequences, answers):
            p = len(s.prompt_ids)
            if len(lps) != len(seq):
                raise TeacherRequestError(f"teacher returned {len(lps)} prompt log-probs for {len(seq)} tokens")
            out.append([float(_entry(lps[j], seq[j])["logprob"]) for j in range(p, len(seq))])
            if self.top_logprobs > 0:
                self._topk[tuple(seq)] = self._parse_topk(lps)
        return out

    @staticmethod
    def _parse_topk(lps: list[dict | None]) -> _TopK:
        width = max((len(d) for d in lps if d), default=1)
        ids: np.ndarray = np.full((len(lps), width), -1, dtype=np.int64)
        vals: np.ndarray = np.zeros((len(lps), width), dtype=np.float32)
        for j, d in enumerate(lps):
            if not d:
                continue
            for c, (tok, entry) in enumerate(d.items()):
                ids[j, c] = int(tok)
                vals[j, c] = entry["logprob"]
        return _TopK(ids, vals)

    def distributions(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> TopKLogprobs:
        """The teacher's top-k next-token log-probs for a right-padded batch of sampled sequences.

        Sequences scored by the last ``score`` call are answered from its top-k lists; any other sequence
        is sent to the server now.
        """
        if self.top_logprobs <= 0:
            raise ValueError("this teacher was built without top_logprobs; the full-distribution losses need it")
        lengths = attention_mask_BT.sum(-1).tolist()
        rows = [tuple(input_ids_BT[i, :n].tolist()) for i, n in enumerate(lengths)]
        missing = [r for r in dict.fromkeys(rows) if r not in self._topk]
        if missing:
            for r, lps in zip(missing, self._fetch(missing, self.top_logprobs)):
                self._topk[r] = self._parse_topk(lps)
        B, T = input_ids_BT.shape
        K = max(self._topk[r].ids_LK.shape[1] for r in rows)
        ids = torch.zeros((B, T, K), dtype=torch.long)
        vals = torch.zeros((B, T, K), dtype=torch.float32)
        valid = torch.zeros((B, T, K), dtype=torch.bool)
        for i, r in enumerate(rows):
            top = self._topk[r]
            n, k = len(r), top.ids_LK.shape[1]
            # position t predicts token t + 1: row t + 1 of the server's list
            row_ids = torch.from_numpy(top.ids_LK[1:n])
            ids[i, : n - 1, :k] = row_ids.clamp(min=0)
            vals[i, : n - 1, :k] = torch.from_numpy(top.logprobs_LK[1:n])
            valid[i, : n - 1, :k] = row_ids >= 0
        return TopKLogprobs(ids, vals, valid)

    kl_targets = distributions  # the Teacher protocol's name (distill/teacher.py)
