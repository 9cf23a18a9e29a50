#!/usr/bin/env bash
# Entry point of the image: the project's commands by short name, anything else exec'd as given.
#   train ARGS      accelerate launch train.py ARGS
#   train LAUNCH_ARGS -- ARGS    accelerate launch LAUNCH_ARGS train.py ARGS   (e.g. train --num_processes 8 -- --config ...)
#   evaluate ARGS   python evaluate.py ARGS
#   bench ARGS      python bench.py ARGS
#   shards ARGS     simclr-shards ARGS
#   demo [MAKEARGS] the embedded demo (make demo: generated shapes -> shards -> pretrain -> evaluate), in WORKDIR
#   CMD ...         e.g. bash, python, accelerate
set -euo pipefail

home=${SIMCLR_HOME:-/opt/simclr}

usage() {
    sed -n '2,10s/^# \{0,1\}//p' "$0"
}

if [ $# -eq 0 ]; then
    usage
    exit 0
fi

command=$1
shift
case "$command" in
    -h | --help | help) usage ;;
    train)
        launch=()  # accelerate launch's own flags: whatever comes before a "--"
        for ((i = 1; i <= $#; i++)); do
            if [ "${!i}" = "--" ]; then
                launch=("${@:1:i-1}")
                shift "$i"
                break
            fi
        done
        # docker stop (SIGTERM) or docker kill -s USR1: tini hands the signal to the launcher's process group. One
        # process: the launcher ignores it (the trap) and train.py, in the same group, checkpoints and exits with
        # status 75. Several processes: torchrun's agent handles the signals of PET_SIGNALS_TO_HANDLE (its
        # --signals_to_handle; torch's default list has no SIGUSR1) and forwards them to its workers (each in a
        # session of its own), then kills them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (torch's default 30; give
        # `docker stop -t` more than this). A checkpoint takes seconds (README, "Reliability").
        export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
        export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
        trap '' TERM INT USR1
        exec accelerate launch "${launch[@]}" "$home/train.py" "$@"
        ;;
    evaluate) exec python "$home/evaluate.py" "$@" ;;
    bench) exec python "$home/bench.py" "$@" ;;
    shards) cd "$home" && exec simclr-shards "$@" ;;
    demo) exec make -C "$home" -o .venv/.installed BIN="$(dirname "$(command -v python)")" "$@" demo ;;
    *) exec "$command" "$@" ;;
esac
