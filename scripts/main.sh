#!/usr/bin/env bash
# The main job on embedded defaults. Until the pipeline lands this is the most complete job
# we have: the attention benchmark in the article's setup, written to runs/bench/.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mkdir -p runs/bench
exec turbo bench attention --json runs/bench/attention.json --markdown runs/bench/attention.md "$@"
