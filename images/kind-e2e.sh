#!/usr/bin/env bash
# End to end on a local kind cluster (needs a Docker engine, kind, kubectl and helm on PATH):
#   1. create the kind cluster $KIND_CLUSTER (kept if it exists),
#   2. build the operator and CPU runtime images with the test suite's own build (tests/support/controlplane/
#      images.py: base image, docker build, cache by the hash of the inputs), tag them
#      $REGISTRY/<image>:$TAG and load them into the cluster,
#   3. install charts/opd-operator into $NAMESPACE,
#   4. apply examples/tiny-math.yaml there and wait until its phase is Succeeded (or Failed).
# `make kind-e2e` runs this; KEEP_CLUSTER=0 deletes the cluster at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIND_CLUSTER="${KIND_CLUSTER:-opd-e2e}"
NAMESPACE="${NAMESPACE:-opd}"
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)}"
REGISTRY="${REGISTRY:-ghcr.io/opd-dev}"
TIMEOUT="${TIMEOUT:-3600}"     # seconds to wait for the run
KEEP_CLUSTER="${KEEP_CLUSTER:-1}"
PYTHON="${PYTHON:-python3}"    # any CPython >= 3.11: the build helper uses the standard library only
# OPD_PYTHON_IMAGE: the base image (the Dockerfiles' PYTHON_IMAGE); unset, their default is pulled.

die() { echo "kind-e2e: $*" >&2; exit 1; }
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || die "'$tool' is not on PATH (this target needs docker, kind, kubectl and helm)"
done
docker info >/dev/null 2>&1 || die "no Docker engine is reachable (docker info failed); start one or point DOCKER_HOST at one"

cd "$ROOT"
if ! kind get clusters | grep -qx "$KIND_CLUSTER"; then
  kind create cluster --name "$KIND_CLUSTER" --wait 120s
fi
ctx="kind-$KIND_CLUSTER"
k() { kubectl --context "$ctx" "$@"; }
cleanup() { [ "$KEEP_CLUSTER" = 1 ] || kind delete cluster --name "$KIND_CLUSTER"; }
trap cleanup EXIT

# The suite's build (the real-node test builds the same images the same way): prints `<image> <local tag>`.
PYTHONSAFEPATH=1 "$PYTHON" tests/support/controlplane/images.py | while read -r image built; do
  docker tag "$built" "$REGISTRY/opd-$image:$TAG"
done
kind load docker-image --name "$KIND_CLUSTER" "$REGISTRY/opd-operator:$TAG" "$REGISTRY/opd-runtime-cpu:$TAG"

helm --kube-context "$ctx" upgrade --install opd-operator charts/opd-operator \
  --namespace "$NAMESPACE" --create-namespace \
  --values charts/opd-operator/ci/kind-values.yaml \
  --set image.repository="$REGISTRY/opd-operator" --set image.tag="$TAG" \
  --wait --timeout 5m

# The example names the published runtime image; point it at the one just built and loaded.
sed "s#^\(  image: \).*opd-runtime-cpu:.*#\1$REGISTRY/opd-runtime-cpu:$TAG#" examples/tiny-math.yaml \
  | k -n "$NAMESPACE" apply -f -
echo "kind-e2e: waiting up to ${TIMEOUT}s for DistillationRun tiny-math (kubectl -n $NAMESPACE get dr -w)"
deadline=$(( $(date +%s) + TIMEOUT ))
phase=""
while [ "$(date +%s)" -lt "$deadline" ]; do
  phase="$(k -n "$NAMESPACE" get distillationrun tiny-math -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  case "$phase" in
    Succeeded) echo "kind-e2e: tiny-math Succeeded"; k -n "$NAMESPACE" get dr tiny-math -o wide; exit 0 ;;
    Failed) break ;;
  esac
  sleep 10
done
echo "kind-e2e: tiny-math ended in phase '${phase:-<none>}'" >&2
k -n "$NAMESPACE" get dr,jobs,pods -o wide >&2 || true
k -n "$NAMESPACE" describe dr tiny-math >&2 || true
k -n "$NAMESPACE" logs deploy/opd-operator --tail=100 >&2 || true
exit 1
