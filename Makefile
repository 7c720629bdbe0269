# Two commands for a newcomer: `make run` and `make test` (see README.md).
PORT ?= 8501
HOST ?= 127.0.0.1
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint format screenshots

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# Creates data.db, starts a queue consumer and the web server; Ctrl-C stops both.
run: install
	PORT=$(PORT) HOST=$(HOST) $(PY) -m cli serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest


# Refreshes docs/screenshots/ through the browser test (needs chromium).
screenshots: install
	SCREENSHOTS=1 $(PY) -m pytest tests/test_browser.py
