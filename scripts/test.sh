#!/usr/bin/env bash
# The test suite, slow tests included. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check .
exec python -m pytest "$@"
