# Two entry points for newcomers: `make run` and `make test`. Everything else is a building block.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
HOST ?= 127.0.0.1
PORT ?= 8000
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/datacenter
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0
PYTEST_ARGS ?=
DEMO_AGENTS ?= 1

.PHONY: run test contract guest-variants lint bench lab lab-down deps deps-portal apt services migrate seed clean p2v-worker

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel >/dev/null

# Portal install for `make run`: the Python packages, plus the libvirt binding when it can be built
# (root on Debian: libvirt-dev); without it the portal runs and conversions report why they can't.
var/.deps-portal: requirements.txt requirements-system.txt constraints.txt | $(BIN)/python
	@mkdir -p var
	./scripts/install-apt.sh binding
	$(PIP) install -c constraints.txt -r requirements.txt
	$(PIP) install "$$(grep -i '^libvirt-python' requirements-system.txt)" || echo "deps: libvirt binding not built; P2V conversions are unavailable"
	$(PIP) install --no-deps -e .
	@touch $@

# Everything the suite needs: Debian packages (when root), the bindings that compile against them.
var/.deps-test: constraints.txt requirements.txt requirements-dev.txt requirements-system.txt scripts/install-apt.sh | $(BIN)/python
	@mkdir -p var
	./scripts/install-apt.sh
	$(PIP) install -c constraints.txt -r requirements-dev.txt
	$(PIP) install --no-deps -e .
	$(PIP) install -c constraints.txt -r requirements-system.txt || echo "deps: system bindings did not build (tests that need them skip locally, fail in CI)"
	@touch var/.deps-portal $@

deps-portal: var/.deps-portal
deps: var/.deps-test

services:
	./scripts/start-services.sh

migrate: var/.deps-portal
	$(BIN)/python manage.py migrate --no-input

seed: migrate
	$(BIN)/python manage.py seed_demo $(if $(filter 0,$(DEMO_AGENTS)),--no-agents,)

# `make run`: the embedded portal plus two simulated demo muxes (DEMO_AGENTS=0 turns them off).
run: seed
	$(BIN)/python manage.py collectstatic --no-input -v 0
	@echo "Portal on http://$(HOST):$(PORT)/  (API docs: http://$(HOST):$(PORT)/api/docs/)"
	DEMO_AGENTS=$(DEMO_AGENTS) DEMO_PORTAL_URL=ws://$(HOST):$(PORT)/ws/agents/ \
	  $(BIN)/python -m uvicorn datacenter.asgi:application --host $(HOST) --port $(PORT) --lifespan on

test: deps services
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(BIN)/python -m pytest $(PYTEST_ARGS)

# The schemathesis API contract run alone (docs/operations.md); `make test` runs it too.
contract: deps services
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(BIN)/python -m pytest -m contract tests/contract $(PYTEST_ARGS)

# The real guest's variants (issue 13): a host-only initramfs rebuilt natively, a source without
# python3, an LVM + XFS root. Each is a full conversion under emulation (4-16 minutes on this
# machine) on top of a cached variant build, too long for `make test`'s 30-minute budget.
guest-variants: deps services
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(BIN)/python -m pytest -m guest_variants tests/p2v_real $(PYTEST_ARGS)

lint: var/.deps-test
	$(BIN)/ruff check .

bench: deps services
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(BIN)/python bench/run_all.py

lab: deps
	$(BIN)/lbagent lab up

lab-down:
	$(BIN)/lbagent lab down

clean:
	rm -rf $(VENV) var/.deps-* staticfiles

# A P2V worker on a hypervisor host, as root: consumes only that hypervisor's queue (p2v-hv-<name>).
# The portal must run with P2V_HYPERVISOR_QUEUES=1; DATABASE_URL, REDIS_URL and DJANGO_SECRET_KEY
# are the portal's own (docs/p2v-conversion.md, "Where conversions run").
# Usage: make p2v-worker HYPERVISOR="kvm-1" [P2V_WORKER_CONCURRENCY=2]
P2V_WORKER_CONCURRENCY ?= 2
p2v-worker: var/.deps-portal
	@test -n "$(HYPERVISOR)" || { echo 'p2v-worker: set HYPERVISOR=<the hypervisor name in the portal>' >&2; exit 2; }
	@for v in DATABASE_URL REDIS_URL DJANGO_SECRET_KEY; do test -n "$${!v}" || { echo "p2v-worker: set $$v (the portal's value)" >&2; exit 2; }; done
	./scripts/install-apt.sh p2vworker
	$(PIP) install "$$(grep -i '^libvirt-python' requirements-system.txt)"
	$(BIN)/python -c 'import libvirt' || { echo 'p2v-worker: the libvirt binding is missing (libvirt-dev, gcc)' >&2; exit 1; }
	queue=$$($(BIN)/python -c 'import sys; from p2v.conversion.workers import hypervisor_queue; print(hypervisor_queue(sys.argv[1]))' "$(HYPERVISOR)") && \
	P2V_HYPERVISOR_QUEUES=1 exec $(BIN)/celery -A datacenter worker -Q "$$queue" -n "p2v-$$queue@%h" \
		--concurrency $(P2V_WORKER_CONCURRENCY) --loglevel INFO
