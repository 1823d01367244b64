# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test bench clean system-deps

# The editable install maps the packages that exist when it runs: a new package
# (a new top-level */__init__.py) needs a reinstall, so it is a prerequisite too.
$(STAMP): pyproject.toml $(wildcard */__init__.py)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing PsEPR-py and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	@( $(BIN)/python -m pip install --upgrade pip && $(BIN)/python -m pip install -e '.[test]' ) \
		> $(VENV)/install.log 2>&1 || { tail -30 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/psepr run

# The multi-host tests build network namespaces with iproute2 (Debian package), whose
# `ss` also gives `psepr bench failure` its per-socket traffic counters.
system-deps:
	@{ command -v ip && command -v ss; } >/dev/null 2>&1 || { echo "installing iproute2 (network namespaces for the multi-host tests)"; \
		apt-get update -qq >/dev/null && apt-get install -y -qq iproute2 >/dev/null; }

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/psepr bench hop

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
