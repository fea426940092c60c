# qai — make demo / make test on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qai-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := softhsm2 opensc chromium prometheus
PYTEST_ARGS ?= -n 2

.PHONY: setup system-packages services demo test lint typecheck bench bench-kms bench-ledger bench-ingest bench-harness bench-nightly bench-policy bench-scheduler bench-uploader clean

setup: system-packages $(STAMP)

# apt-installs what the embedded default needs, only when it is missing (prometheus: for promtool,
# which tests/test_infra.py runs on infra/prometheus/).
system-packages:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v pkcs11-tool >/dev/null || missing="$$missing opensc"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (python3 3.11)"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The test suite needs the machine's PostgreSQL and Redis; start them when they are down and fail
# loudly when they cannot be started.
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
	  echo "starting PostgreSQL"; \
	  $(SUDO) pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
	  for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; \
	  pg_isready -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is required and could not be started"; exit 1; }; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  echo "starting Redis"; \
	  $(SUDO) redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
	    --dir /var/lib/redis --logfile /var/log/redis/ci.log; \
	  for i in $$(seq 1 30); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 1; done; \
	  redis-cli -h 127.0.0.1 ping >/dev/null || { echo "Redis is required and could not be started"; exit 1; }; }

demo: setup
	$(VENV)/bin/qai demo

test: setup services
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	@set +e; $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint:
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy

bench: bench-kms bench-ledger bench-ingest bench-harness bench-nightly bench-policy bench-scheduler bench-uploader

bench-kms: setup services
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }
	$(PY) bench/kms_bench.py

bench-ledger: setup services
	$(PY) bench/ledger_bench.py

bench-ingest: setup services
	$(PY) bench/ingest_bench.py

bench-harness: setup
	$(PY) bench/harness_bench.py

# The nightly harness workload on its own embedded default (.qai-nightly), timed.
# The EM policy's serving speed. Needs the training data of docs/em-policy.md (made here if missing,
# about 20 min on 2 cores); trains a policy first unless POLICY_BUNDLE names one.
POLICY_DATA ?= .qai/policy-data/train.parquet
bench-policy: setup
	[ -f $(POLICY_DATA) ] || $(VENV)/bin/qai harness run --circuits-per-family 4 --no-store --out $(POLICY_DATA)
	$(PY) bench/policy_bench.py --data $(POLICY_DATA) $(if $(POLICY_BUNDLE),--bundle $(POLICY_BUNDLE))

# Scheduling over HTTP with 50 backends; trains a small policy on the test dataset (made on first use).
bench-scheduler: setup
	$(PY) bench/scheduler_bench.py

bench-uploader: setup
	$(PY) bench/uploader_bench.py --latency-ms 20

bench-nightly: setup
	rm -rf .qai-nightly
	time QAI_HOME=.qai-nightly $(VENV)/bin/qai harness run --out .qai-nightly/out
	rm -rf .qai-nightly
	time QAI_HOME=.qai-nightly $(VENV)/bin/qai nightly run-once
	time QAI_HOME=.qai-nightly $(VENV)/bin/qai nightly run-once --force-retrain

clean:
	rm -rf .qai .qai-nightly
