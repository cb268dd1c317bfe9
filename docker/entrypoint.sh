#!/usr/bin/env bash
# Container entrypoint (also runs outside a container). Forms:
#   <subcommand> [ARGS...]                      python -m vwe SUBCOMMAND ARGS   (a leading "vwe" is allowed)
#   --version, or any other leading option      python -m vwe OPTIONS...
#   launch [ACCELERATE FLAGS...] <subcommand> [ARGS...]
#                                               accelerate launch FLAGS -m vwe SUBCOMMAND ARGS
#   slurm-launch <subcommand> [ARGS...]         slurm/launch.sh: one launcher per node under srun
#   any other command (bash, python, ...)       run as given
# Environment: VWE_PYTHON (default python3), VWE_HOME (where launch/ and slurm/ live: the image's
# /opt/vwe, or this checkout).
set -euo pipefail

here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
if [ -z "${VWE_HOME:-}" ]; then
    if [ -d "$here/../slurm" ]; then VWE_HOME="$(cd "$here/.." && pwd)"; else VWE_HOME=/opt/vwe; fi
fi
export VWE_HOME
python="${VWE_PYTHON:-python3}"
# Caches (torch hub, triton, inductor, matplotlib) live under $HOME. Under `docker run --user <uid>` or a
# read-only image there may be no writable home: use a private folder in $TMPDIR instead.
if [ -z "${HOME:-}" ] || [ ! -w "${HOME}" ]; then
    HOME="${TMPDIR:-/tmp}/vwe-home-$(id -u)"
    mkdir -p "$HOME"
    export HOME
fi
# The vwe subcommands (kept equal to vwe/cli.py's; a test checks).
SUBCOMMANDS=(synth prepare train infer segment segment-eval irn-labels irn-train random-walk pipeline evaluate refine
             import-weights visualize demo doctor config bench)

is_subcommand() {
    local s
    for s in "${SUBCOMMANDS[@]}"; do [ "$1" = "$s" ] && return 0; done
    return 1
}

usage() {
    cat <<USAGE
vwe container entrypoint
  <subcommand> [args]                          run vwe: ${SUBCOMMANDS[*]}
  --version                                    vwe's version (any leading option goes to vwe)
  launch [accelerate flags] <subcommand> [args] run vwe under accelerate launch, e.g.
      launch --config_file launch/multi_gpu.yaml --num_processes 8 train --config configs/voc.yaml
  slurm-launch <subcommand> [args]             per-node launcher for srun (see slurm/launch.sh)
  <command> [args]                             any other command, e.g. bash
USAGE
}

[ "$#" -gt 0 ] || { usage; exit 0; }
[ "$1" != vwe ] || shift
[ "$#" -gt 0 ] || { usage; exit 0; }

case "$1" in
    -h|--help|help)
        usage
        echo
        exec "$python" -m vwe --help
        ;;
    launch)
        shift
        flags=()
        while [ "$#" -gt 0 ] && ! is_subcommand "$1"; do
            if [ "$1" = -- ]; then shift; break; fi
            flags+=("$1"); shift
        done
        if [ "$#" -eq 0 ] || ! is_subcommand "$1"; then
            echo "entrypoint: launch needs a vwe subcommand (${SUBCOMMANDS[*]}) after the accelerate flags" >&2
            exit 2
        fi
        exec "$python" -m accelerate.commands.launch "${flags[@]}" -m vwe "$@"
        ;;
    slurm-launch)
        shift
        exec "$VWE_HOME/slurm/launch.sh" "$@"
        ;;
    -*)
        exec "$python" -m vwe "$@"
        ;;
    *)
        if is_subcommand "$1"; then
            exec "$python" -m vwe "$@"
        fi
        exec "$@"
        ;;
esac
