#!/usr/bin/env bash
# Sets the host up (scripts/host-setup.sh), then runs the quality gates and the whole
# test suite against the real libvirt daemon: ruff, mypy --strict, import-linter, promtool,
# pytest.
# Arguments are passed to pytest (e.g. -k reconnect).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/host-setup.sh
echo "==> ruff" >&2
.venv/bin/ruff check agent handlers tests bench demo
.venv/bin/ruff format --check agent handlers tests bench demo
echo "==> mypy --strict" >&2
.venv/bin/mypy
echo "==> lint-imports (layers point down: [tool.importlinter] in pyproject.toml)" >&2
.venv/bin/lint-imports
echo "==> promtool (alert rules and their tests: config/prometheus, tests/prometheus)" >&2
promtool check rules config/prometheus/alerts.yml
promtool test rules tests/prometheus/alerts_test.yml
echo "==> pytest" >&2
exec .venv/bin/pytest "$@"
