# gradwatch: `make demo` to see it work, `make test` to prove it does. Both set themselves up from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := server,postgres,torch,lightning,transformers,dev

.PHONY: venv demo serve test test-fast fuzz check bench score clean prometheus-tools browser dashboards

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

serve: $(STAMP)
	$(VENV)/bin/gradwatch db upgrade && $(VENV)/bin/gradwatch serve

# HF_HUB_OFFLINE: the Hugging Face tests build their model from a config; nothing may be fetched from a hub
test: $(STAMP) prometheus-tools browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# the pure core (client, detectors, wire): no server, no database, no torch; seconds, for every edit
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/client -m "not service and not torch and not slow" $(PYTEST_ARGS)

# the schema fuzz test (schemathesis against live servers on SQLite and PostgreSQL) with many more examples than
# `make test` gives it: about 10 minutes here; FUZZ_EXAMPLES=N to change
FUZZ_EXAMPLES ?= 400
fuzz: $(STAMP)
	GRADWATCH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/service/test_fuzz.py $(PYTEST_ARGS)

# Prometheus, promtool, Alertmanager and amtool for the alerting tests, from Debian's packages when missing (as
# root). Without them those tests skip, except under CI=true, where they fail. The tests start their own
# servers on free loopback ports, whatever service the packages may have started.
PROMETHEUS_BINS := prometheus promtool prometheus-alertmanager amtool
prometheus-tools:
	@for b in $(PROMETHEUS_BINS); do command -v $$b >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing prometheus and prometheus-alertmanager (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus prometheus-alertmanager >/dev/null || echo "apt-get failed: the Prometheus tests will say so"; \
	  else echo "prometheus/prometheus-alertmanager missing and not installable here (needs root and apt-get)"; fi; \
	fi

# Debian's chromium for the page tests (tests/service/test_pages.py drives it with Playwright: browser downloads are
# not reachable here), when missing (as root). Without it those tests skip, except under CI=true, where they fail.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium >/dev/null || echo "apt-get failed: the page tests will say so"; \
	  else echo "chromium missing and not installable here (needs root and apt-get)"; fi; \
	fi

check: $(STAMP)
	$(VENV)/bin/ruff check setup.py client service migrations tests bench examples tools
	$(VENV)/bin/mypy client/gradwatch service/gradwatch_service

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/storage.py
	$(PY) bench/detect.py
	$(PY) bench/client_overhead.py

# the Grafana dashboards (deploy/grafana/dashboards/*.json) from tools/dashboards.py; tests/test_dashboards.py
# fails when the committed JSON is not what it writes
dashboards: $(STAMP)
	$(PY) tools/dashboards.py

clean:
	rm -rf $(VENV) .gradwatch .pytest_cache

# detection quality: gradwatch's alerts beside every baseline the field ships, on the dev traces and the real
# large-model logs (TRACES=dir scores one directory instead); tools/lofo.py is the leave-one-family-out forecast
SCORE_SETS ?= $(or $(TRACES),../shared/traces/dev ../shared/traces/real-dev)
score: $(STAMP)
	@mkdir -p bench/out
	@for set in $(SCORE_SETS); do \
	  name=$$(basename $$set); \
	  $(VENV)/bin/gradwatch replay $$set --out bench/out/gradwatch-$$name.jsonl || exit 1; \
	  $(PY) $(or $(SCORER),../shared/tools/score.py) --traces $$set --alerts bench/out/gradwatch-$$name.jsonl \
	    --baseline all --by-family || exit 1; \
	done
