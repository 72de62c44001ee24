# The two commands: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# JVM jars (Apache Kafka broker, delta-spark), fetched by Maven at install time into the venv;
# the product finds them under sys.prefix/share/lambdalake/jars. Nothing is fetched at run time.
JARS := $(VENV)/share/lambdalake/jars
JARS_STAMP := $(JARS)/.installed

.PHONY: install test demo lint format typecheck bench clean check-java check-maven browser lock audit audit-if-reachable

install: $(STAMP) $(JARS_STAMP)

# Re-install only when the dependency pins change (idempotent otherwise).
$(STAMP): pyproject.toml requirements.lock
	@$(MAKE) --no-print-directory check-java
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e '.[dev,airflow]'
	$(BIN)/python -m pip check
	@touch $(STAMP)
	@echo "installed into $(VENV)"

$(JARS_STAMP): jvm/kafka/pom.xml jvm/delta/pom.xml
	@$(MAKE) --no-print-directory check-java check-maven
	@rm -rf $(JARS) && mkdir -p $(JARS)
	mvn -q -B -f jvm/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(JARS)/kafka
	mvn -q -B -f jvm/delta/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DexcludeTransitive=true -DoutputDirectory=$(CURDIR)/$(JARS)/delta
	@touch $(JARS_STAMP)
	@echo "JVM jars (Kafka broker, delta-spark) in $(JARS)"

check-maven:
	@command -v mvn >/dev/null 2>&1 || { echo "error: Maven not found; it fetches the Kafka and delta-spark jars at install time: sudo apt-get install -y maven (or brew install maven)"; exit 1; }

check-java:
	@v=$$(java -version 2>&1 | awk -F'"' '/version/ {print $$2}' | cut -d. -f1); \
	if [ -z "$$v" ]; then \
	  echo "error: Java not found. PySpark 4 needs Java 17 or newer:"; \
	  echo "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless"; \
	  echo "  macOS: brew install openjdk@17   (then set JAVA_HOME)"; exit 1; \
	elif [ "$$v" -lt 17 ]; then \
	  echo "error: Java $$v found; PySpark 4 needs Java 17 or newer (set JAVA_HOME to a JDK 17+)"; exit 1; \
	fi

# The dashboard test drives Debian's headless Chromium; install it when we can (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the dashboard test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; \
	  else echo "note: chromium not found; the dashboard browser test will be skipped"; fi; }

test: install browser audit-if-reachable lint typecheck
	$(BIN)/python -m pytest

demo: install
	$(BIN)/lambdalake demo

# requirements.lock: the whole tree with hashes, resolved from pyproject.toml by uv (existing pins are kept
# unless pyproject.toml needs others; `make lock UPGRADE=--upgrade` moves them).
lock: install
	$(BIN)/python -m pip install --quiet uv==0.13.9
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra airflow --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --annotation-style line \
	  --custom-compile-command 'make lock' $(UPGRADE) -o requirements.lock

# Known vulnerabilities in the locked tree (pip-audit against PyPI's advisory data). --strict fails on any
# package it could not check, so an unreachable advisory service is a failure here, never a silent pass.
audit: install
	$(BIN)/pip-audit -r requirements.lock --require-hashes --disable-pip --strict --progress-spinner off

# make test audits too when the advisory service answers: a probe pin with published advisories
# (jinja2 2.4.1) must be reported; where it is not (no route to the service), say so and go on.
audit-if-reachable: install
	@printf 'jinja2==2.4.1\n' > $(VENV)/audit-probe.txt; \
	if $(BIN)/pip-audit -r $(VENV)/audit-probe.txt --disable-pip --no-deps --progress-spinner off >/dev/null 2>&1; then \
	  echo "audit: skipped, the vulnerability advisory service is not reachable from this machine (make audit where it is)"; \
	else $(MAKE) --no-print-directory audit; fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/validator.py
	$(BIN)/python bench/generator.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
