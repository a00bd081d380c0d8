#!/usr/bin/env bash
# Builds the local control plane from the Go module proxy and caches it under
# ~/.cache/slmfleet/<component>-<version>/. A warm cache makes this a no-op.
#
#   e2e/build-binaries.sh            build whatever is missing
#   e2e/build-binaries.sh --check    exit 0 only if every binary is cached
#   e2e/build-binaries.sh [--check] minio    only MinIO (components: etcd kwok kubernetes minio gateway-api
#                                            crane helm)
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces the staging modules
# (k8s.io/api, k8s.io/client-go, ...) with local directories. A shim module requires it and
# replaces each staging module with its published v0.Y.Z release instead. etcd is built the same
# way from a shim requiring go.etcd.io/etcd/server/v3 (whose module root is the etcd main package).
# MinIO (the S3 server of the e2e tests) has no replace directives but no semver tags either: it is
# `go install`ed at the pseudo-version of its release tag's commit (see versions.env).
# The Gateway API CRDs (standard channel) come from the sigs.k8s.io/gateway-api module's own
# config/crd/standard/ directory, downloaded through the module proxy; nothing is built.
# crane (images without a Docker engine, and the loopback OCI registry) and helm are plain
# `go install`s; helm gets the version ldflags its own Makefile stamps, or `helm version` and the
# chart's kubeVersion checks would see v3.0.0-unreleased... defaults.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${SLMFLEET_CACHE:-$HOME/.cache/slmfleet}"
kube_dir="$cache/kubernetes-$KUBE_VERSION"
etcd_dir="$cache/etcd-$ETCD_VERSION"
kwok_dir="$cache/kwok-$KWOK_VERSION"
minio_dir="$cache/minio-$MINIO_VERSION"
gateway_dir="$cache/gateway-api-$GATEWAY_API_VERSION"
crane_dir="$cache/crane-$CRANE_VERSION"
helm_dir="$cache/helm-$HELM_VERSION"

kube_ok() {
  local b
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do [[ -x "$kube_dir/$b" ]] || return 1; done
}
etcd_ok() { [[ -x "$etcd_dir/etcd" ]]; }
kwok_ok() { [[ -x "$kwok_dir/kwok" ]]; }
minio_ok() { [[ -x "$minio_dir/minio" ]]; }
gateway_ok() { [[ -f "$gateway_dir/gateway.networking.k8s.io_httproutes.yaml" ]]; }
crane_ok() { [[ -x "$crane_dir/crane" ]]; }
helm_ok() { [[ -x "$helm_dir/helm" ]]; }

check=false
if [[ "${1:-}" == "--check" ]]; then check=true; shift; fi
components=("$@")
[[ ${#components[@]} -gt 0 ]] || components=(etcd kwok kubernetes minio gateway-api crane helm)
for c in "${components[@]}"; do
  case "$c" in
    etcd|kwok|kubernetes|minio|gateway-api|crane|helm) ;;
    *) echo "build-binaries: unknown component '$c' (etcd, kwok, kubernetes, minio, gateway-api, crane, helm)" >&2; exit 2 ;;
  esac
done
if $check; then
  for c in "${components[@]}"; do
    case "$c" in
      etcd) etcd_ok ;; kwok) kwok_ok ;; kubernetes) kube_ok ;; minio) minio_ok ;; gateway-api) gateway_ok ;;
      crane) crane_ok ;; helm) helm_ok ;;
    esac || exit 1
  done
  exit 0
fi

step() { printf '==> [build-binaries] %s\n' "$*"; }

# Runs a build with its output in a log file and one progress line (rewritten in place on a
# terminal, every 30 s otherwise); on failure shows the end of the log.
run_logged() {
  local what="$1"; shift
  local log="$cache/build-$what.log"
  mkdir -p "$cache"
  "$@" >"$log" 2>&1 &
  local pid=$! start=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    local elapsed=$((SECONDS - start))
    if [[ -t 1 ]]; then
      printf '\r    building %s: %dm%02ds elapsed (log: %s) ' "$what" $((elapsed / 60)) $((elapsed % 60)) "$log"
      sleep 1
    else
      sleep 30
      kill -0 "$pid" 2>/dev/null && printf '    building %s: %dm%02ds elapsed (log: %s)\n' "$what" $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$log"
    fi
  done
  [[ -t 1 ]] && printf '\n'
  if ! wait "$pid"; then
    echo "==> [build-binaries] building $what FAILED; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    return 1
  fi
}

export CGO_ENABLED=0
export GOFLAGS="-mod=mod -buildvcs=false"
# Builds are cached by Go too; keep its caches where a warm machine finds them.
export GOTOOLCHAIN=local

build_kube() {
  kube_ok && { step "kubernetes $KUBE_VERSION cached in $kube_dir"; return; }
  local work minor major
  work="$(mktemp -d)"
  major="${KUBE_VERSION#v}"; major="${major%%.*}"
  minor="${KUBE_VERSION#v*.}"; minor="${minor%%.*}"
  local staging_version="v0.${KUBE_VERSION#v*.}"
  step "kubernetes $KUBE_VERSION: writing shim module (staging modules at $staging_version)"
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  {
    echo "module slmfleet.local/kubeshim"
    echo
    echo "go 1.24.0"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    # Every `k8s.io/<m> => ./staging/src/k8s.io/<m>` line of the release's own go.mod.
    sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$staging_version"'#p' "$gomod"
    echo ")"
  } > "$work/go.mod"
  echo 'package kubeshim' > "$work/shim.go"
  step "kubernetes $KUBE_VERSION: $(grep -c ' => ' "$work/go.mod") staging replaces"
  local pkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version
  local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local ld="-s -w"
  for p in $pkg $cpkg; do
    ld+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  mkdir -p "$kube_dir.tmp"
  step "kubernetes $KUBE_VERSION: go build kube-apiserver kube-controller-manager kube-scheduler kubectl (cold: ~10 min on 2 cores)"
  (cd "$work" && run_logged "kubernetes-$KUBE_VERSION" go build -trimpath -ldflags "$ld" -o "$kube_dir.tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      k8s.io/kubernetes/cmd/kubectl)
  rm -rf "$kube_dir"; mv "$kube_dir.tmp" "$kube_dir"; rm -rf "$work"
  step "kubernetes $KUBE_VERSION: done -> $kube_dir"
}

build_etcd() {
  etcd_ok && { step "etcd $ETCD_VERSION cached in $etcd_dir"; return; }
  local work; work="$(mktemp -d)"
  step "etcd $ETCD_VERSION: writing shim module"
  printf 'module slmfleet.local/etcdshim\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$work/go.mod"
  echo 'package etcdshim' > "$work/shim.go"
  mkdir -p "$etcd_dir.tmp"
  step "etcd $ETCD_VERSION: go build"
  (cd "$work" && run_logged "etcd-$ETCD_VERSION" go build -trimpath -ldflags "-s -w" -o "$etcd_dir.tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$etcd_dir"; mv "$etcd_dir.tmp" "$etcd_dir"; rm -rf "$work"
  step "etcd $ETCD_VERSION: done -> $etcd_dir"
}

build_kwok() {
  kwok_ok && { step "kwok $KWOK_VERSION cached in $kwok_dir"; return; }
  mkdir -p "$kwok_dir.tmp"
  step "kwok $KWOK_VERSION: go install"
  GOFLAGS=-buildvcs=false GOBIN="$kwok_dir.tmp" run_logged "kwok-$KWOK_VERSION" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  rm -rf "$kwok_dir"; mv "$kwok_dir.tmp" "$kwok_dir"
  step "kwok $KWOK_VERSION: done -> $kwok_dir"
}

build_minio() {
  minio_ok && { step "minio $MINIO_VERSION cached in $minio_dir"; return; }
  # RELEASE.2025-09-07T16-13-09Z -> 20250907161309: MinIO's tag is its commit's UTC time.
  local stamp="${MINIO_VERSION#RELEASE.}"; stamp="${stamp//[-TZ]/}"
  local module_version="v0.0.0-$stamp-$MINIO_COMMIT"
  step "minio $MINIO_VERSION: module github.com/minio/minio@$module_version"
  local commit
  commit="$(GOFLAGS=-buildvcs=false go mod download -json "github.com/minio/minio@$module_version" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("Origin", {}).get("Hash", ""))')"
  [[ "$commit" == "$MINIO_COMMIT"* ]] || commit="$MINIO_COMMIT"
  # What MinIO's own Makefile stamps (buildscripts/gen-ldflags.go): Version is RFC 3339.
  local released="${MINIO_VERSION#RELEASE.}"
  released="${released%%T*}T$(echo "${released#*T}" | tr '-' ':')"
  local pkg=github.com/minio/minio/cmd
  local ld="-s -w -X $pkg.Version=$released -X $pkg.ReleaseTag=$MINIO_VERSION"
  ld+=" -X $pkg.CommitID=$commit -X $pkg.ShortCommitID=${commit:0:12} -X $pkg.CopyrightYear=${stamp:0:4}"
  mkdir -p "$minio_dir.tmp"
  step "minio $MINIO_VERSION: go install (cold: several minutes on 2 cores)"
  GOFLAGS=-buildvcs=false GOBIN="$minio_dir.tmp" run_logged "minio-$MINIO_VERSION" \
    go install -trimpath -ldflags "$ld" "github.com/minio/minio@$module_version"
  rm -rf "$minio_dir"; mv "$minio_dir.tmp" "$minio_dir"
  step "minio $MINIO_VERSION: done -> $minio_dir"
}

fetch_gateway_api() {
  gateway_ok && { step "gateway-api $GATEWAY_API_VERSION CRDs cached in $gateway_dir"; return; }
  step "gateway-api $GATEWAY_API_VERSION: go mod download (standard-channel CRDs)"
  local dir
  dir="$(GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  mkdir -p "$gateway_dir.tmp"
  cp "$dir"/config/crd/standard/*.yaml "$gateway_dir.tmp/"
  chmod u+w "$gateway_dir.tmp"/*.yaml
  rm -rf "$gateway_dir"; mv "$gateway_dir.tmp" "$gateway_dir"
  step "gateway-api $GATEWAY_API_VERSION: done -> $gateway_dir"
}

build_crane() {
  crane_ok && { step "crane $CRANE_VERSION cached in $crane_dir"; return; }
  mkdir -p "$crane_dir.tmp"
  step "crane $CRANE_VERSION: go install"
  GOBIN="$crane_dir.tmp" run_logged "crane-$CRANE_VERSION" go install -trimpath -ldflags "-s -w" \
    "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
  rm -rf "$crane_dir"; mv "$crane_dir.tmp" "$crane_dir"
  step "crane $CRANE_VERSION: done -> $crane_dir"
}

build_helm() {
  helm_ok && { step "helm $HELM_VERSION cached in $helm_dir"; return; }
  local pkg=helm.sh/helm/v3/internal/version
  local ld="-s -w -X $pkg.version=$HELM_VERSION -X $pkg.gitCommit=$HELM_COMMIT -X $pkg.gitTreeState=clean"
  # As helm's Makefile does: the Kubernetes version `helm template`/`lint` assume without a cluster
  # is that of the client-go it is built with (unstamped, it is v1.20 and refuses kubeVersion >=1.29).
  local gomod client_go
  gomod="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  client_go="$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod" | head -n1)"
  [[ -n "$client_go" ]] || { echo "build-binaries: no k8s.io/client-go in helm's go.mod" >&2; return 1; }
  local p
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$client_go"
  done
  mkdir -p "$helm_dir.tmp"
  step "helm $HELM_VERSION: go install (cold: a few minutes on 2 cores)"
  GOBIN="$helm_dir.tmp" run_logged "helm-$HELM_VERSION" go install -trimpath -ldflags "$ld" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  rm -rf "$helm_dir"; mv "$helm_dir.tmp" "$helm_dir"
  step "helm $HELM_VERSION: done -> $helm_dir"
}

for c in "${components[@]}"; do
  case "$c" in
    crane) build_crane ;; helm) build_helm ;;
    etcd) build_etcd ;; kwok) build_kwok ;; kubernetes) build_kube ;; minio) build_minio ;;
    gateway-api) fetch_gateway_api ;;
  esac
done
step "all binaries ready"
