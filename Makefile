# Single entry point. `make run` = the embedded default experiment; `make test` = the test suite (`make test-fast`:
# without the slow tests); `make compare-worlds` = the finished worlds' comparisons in one table.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all
CONFIG ?= config.yaml

# The Hugging Face settings (HF_HOME with its login token, the hub cache) stay the user's: `make run CONFIG=...`
# runs exactly what `.venv/bin/snakemake --configfile ...` runs. The embedded experiments switch the hub off
# themselves (rules/common.smk); the tests never reach a hub.
export TOKENIZERS_PARALLELISM := false
test test-fast: export HF_HUB_OFFLINE := 1
test test-fast: export HF_DATASETS_OFFLINE := 1
test test-fast: export TRANSFORMERS_OFFLINE := 1

.PHONY: install run smoke test test-fast lint dry-run gpu-check node-wheels node-install node-check test-node compare-worlds clean

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# torch is pinned inside requirements.lock and installed in this same pip call, so pip never pulls a CUDA build.
	# The lock is complete (tested), so no dependency resolution; the bytecode is compiled on every core
	# afterwards instead of one file at a time by pip (as pip does, a file that does not compile is skipped:
	# torch ships test files in Python 3.12 syntax).
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-compile -r requirements.lock
	$(BIN)/python -m compileall -qq -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || true
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# results/<experiment>/report.html: the tables and figures with their captions (snakemake --report, offline)
REPORT_HTML = $$($(BIN)/python -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); print(c.get("results_dir", "results") + "/" + c["experiment"] + "/report.html")' $(CONFIG))

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG)
	$(BIN)/snakemake --configfile $(CONFIG) --report $(REPORT_HTML)

smoke: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile configs/smoke.yaml

dry-run: $(STAMP)
	$(BIN)/snakemake -n --configfile $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The suite without the tests marked slow (pyproject.toml: those that start Snakemake, torchrun or lm-eval, or take
# over ~3 s): about a minute, for the edit-test loop. `make test` (what CI runs) still runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# ruff (its config is in pyproject.toml) over the Python, then Snakemake's own linter over the rules. CI runs it.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint

# The paper's pipeline on a random-initialised Llama-3.2-1B-shaped model and generated data (nothing downloaded),
# one JSON line of tokens/s, MFU and peak GPU memory (docs/gpu-check.md); without CUDA a tiny model in seconds.
# GPU_CHECK_ARGS: e.g. --preset llama-3.2-3b, or --out DIR (default results/gpu-check).
gpu-check: export HF_HUB_OFFLINE := 1
gpu-check: export HF_DATASETS_OFFLINE := 1
gpu-check: export TRANSFORMERS_OFFLINE := 1
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py $(GPU_CHECK_ARGS)

# Offline GPU nodes (docs/gpu-check.md): the node's image brings Python 3.12 and its PyTorch stack; the wheels of
# what it lacks (envs/node-wheels.lock) travel with the working tree. On a machine with an index: `make node-wheels`
# (wheels/node/, at most 64 MiB). On the node: `make node-install` (.node/site, no index; add it to PYTHONPATH as
# printed) or `make node-check OUT=DIR` (install, the Llama-3.2-1B-shape check, its JSON line and logs in DIR;
# NODE_ARGS="--preset llama-3.2-3b" for the 3B shape). NODE_PYTHON: the image's Python.
NODE_PYTHON ?= python3
NODE_ARGS ?=
node-wheels:
	python3 scripts/node.py wheels

node-install:
	$(NODE_PYTHON) scripts/node.py install

node-check:
	@test -n "$(OUT)" || { echo "error: name the output folder: make node-check OUT=DIR"; exit 1; }
	$(NODE_PYTHON) scripts/node.py check --out $(OUT) $(NODE_ARGS)

# The rehearsal of a node on this CPU, its own lane (not part of `make test`): a Python 3.12 virtual environment
# with the node image's packages (envs/node-image.lock: torch 2.11, transformers 5.17, ...; about 5 GB, torch's
# CUDA libraries included), then the node's own command with the wheels (the tiny preset through the workflow,
# into results/node-rehearsal/), then the fast tests on that stack (those marked `pinned` check the pinned
# environment itself and are left out).
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
NODE_VENV := .venv-node
$(NODE_VENV)/.installed: envs/node-image.lock
	@$(PYTHON312) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || { echo "error: $(PYTHON312) is not Python 3.12; run 'make test-node PYTHON312=/path/to/python3.12'"; exit 1; }
	test -d $(NODE_VENV) || $(PYTHON312) -m venv $(NODE_VENV)
	$(NODE_VENV)/bin/pip install --disable-pip-version-check -q --no-deps --no-compile -r envs/node-image.lock
	touch $@

wheels/node/manifest.json: envs/node-wheels.lock
	python3 scripts/node.py wheels

test-node: $(NODE_VENV)/.installed wheels/node/manifest.json
	$(NODE_VENV)/bin/python scripts/node.py check --out results/node-rehearsal --preset tiny --cores 2
	PYTHONPATH=$(CURDIR)/.node/site:$(CURDIR) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		$(NODE_VENV)/bin/python -m pytest -q -m "not slow and not pinned" -p no:cacheprovider

# The default world and the single-template stress-case world side by side (docs/results.md, "Comparing worlds"):
# results/worlds.csv and results/worlds.md from the two finished studies (five draws of each world, every method:
# configs/study.yaml and configs/single-template/study.yaml). It runs neither study: finish them first.
compare-worlds: $(STAMP)
	$(BIN)/tokenclean compare --world paper-setting=results/study --world single-template=results/single-template-study --out-csv results/worlds.csv --out-md results/worlds.md

clean:
	rm -rf results .snakemake
