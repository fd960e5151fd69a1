# kdcache — `make help` lists the targets and the variables they take.
#
#   make cache-teacher train-student   # default teacher -> logit store -> KD vs CE-only student
#   make test                          # ruff + mypy (storage/) + pytest, what CI runs
#
# Every target that runs project code depends on `install`, which builds `$(VENV)` once
# (a stamp file makes later runs instant; it is redone only when pyproject.toml changes).

SHELL := /bin/bash
.DEFAULT_GOAL := help

# --- environment -----------------------------------------------------------------------------
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdcache-installed
# CPU-only machines get the CPU wheel of torch first, so pip never pulls a multi-GB CUDA build
TORCH_CPU ?= torch==2.13.0
# where that CPU wheel comes from: empty = pip's configured sources (here a local wheel dir);
# elsewhere e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

# --- stage one: teacher and store ------------------------------------------------------------
TEACHER ?=
DEFAULT_TEACHER ?= artifacts/teacher
TEACHER_STEPS ?= 150
TEACHER_CORPUS ?= stdlib
CORPUS ?= stdlib
# CORPUS=stdlib-chat without TEACHER: the default teacher tuned on the records' training split
# (build-teacher --from, TUNE_STEPS steps; empty = build-teacher's default) caches the store
CHAT_TEACHER ?= artifacts/teacher-stdlib-chat
TUNE_STEPS ?=
CHAT_DEFAULT = $(if $(TEACHER),,$(filter stdlib-chat,$(CORPUS)))
CACHE_TEACHER_DIR = $(or $(TEACHER),$(if $(CHAT_DEFAULT),$(CHAT_TEACHER),$(DEFAULT_TEACHER)))
# compare runs the teacher the last cache-teacher ran (TEACHER overrides)
LAST_TEACHER_FILE := artifacts/last-teacher
TEACHER_DIR = $(or $(TEACHER),$(shell cat $(LAST_TEACHER_FILE) 2>/dev/null),$(DEFAULT_TEACHER))
# STORE empty: cache-teacher writes artifacts/store (artifacts/store-<corpus> for another
# CORPUS, e.g. artifacts/store-stdlib-chat) and remembers it; train-student, compare and sweep
# read the store cache-teacher wrote last
STORE ?=
LAST_STORE_FILE := artifacts/last-store
CACHE_STORE = $(or $(STORE),artifacts/store$(if $(filter-out stdlib,$(CORPUS)),-$(subst *,all,$(notdir $(basename $(CORPUS))))))
READ_STORE = $(or $(STORE),$(shell cat $(LAST_STORE_FILE) 2>/dev/null),artifacts/store)
TARGETS ?= sampled
TOPK ?= 32
SAMPLES ?= 32
# the temperature the draws are made at: sampled-kl trains at that temperature only
SAMPLE_TEMPERATURE ?= $(TEMPERATURE)
SEQLEN ?= 256
FORMAT ?= zarr
EVAL_FRACTION ?= 0.02
MAX_TOKENS ?= 600000
THREADS ?= 2

# --- stage two: students ---------------------------------------------------------------------
STUDENT ?= tiny
STEPS ?= 300
BATCH_SIZE ?= 8
LOSS ?= auto
TEMPERATURE ?=
ALPHA ?=
SEED ?= 0
TRAIN_ARGS ?=
OUT ?= runs/kd
CE_OUT ?= runs/ce
SWEEP ?= pipeline/configs/sweep.yaml
SWEEP_OUT ?= runs/sweep

# --- tests -----------------------------------------------------------------------------------
PYTEST_ARGS ?=

KDCACHE := $(BIN)/kdcache
STUDENT_ARGS = --store $(READ_STORE) --student $(STUDENT) --steps $(STEPS) --batch-size $(BATCH_SIZE) \
	--seed $(SEED) $(if $(TEMPERATURE),--temperature $(TEMPERATURE)) $(if $(ALPHA),--alpha $(ALPHA)) \
	$(TRAIN_ARGS)

.PHONY: help install teacher chat-teacher cache-teacher train-student compare sweep test test-floors test-minutes lint format \
	cli-reference docs bench fidelity fidelity-codec clean distclean

help: ## list targets and variables
	@echo "kdcache — offline knowledge distillation"
	@echo
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/\1|\2/' | \
		awk -F'|' '{printf "  %-16s %s\n", $$1, $$2}'
	@echo
	@echo "Variables (current value):"
	@echo "  TEACHER=$(TEACHER)      HF id or model dir; empty = build the default into $(DEFAULT_TEACHER);"
	@echo "                 compare (and train-student's table) runs TEACHER, else the last cache-teacher's teacher"
	@echo "  TEACHER_STEPS=$(TEACHER_STEPS)  training steps of the default teacher"
	@echo "  CHAT_TEACHER=$(CHAT_TEACHER)  CORPUS=stdlib-chat without TEACHER caches from the default"
	@echo "                 tuned on the records' training split (held-out records untouched) into this dir"
	@echo "  TUNE_STEPS=$(TUNE_STEPS)  its fine-tune steps (empty = build-teacher --from's default)"
	@echo "  CORPUS=$(CORPUS)        dir, file, glob of .txt/.md/.py/.jsonl/.parquet, stdlib or stdlib-chat"
	@echo "  TEACHER_CORPUS=$(TEACHER_CORPUS)  what the default teacher is trained on"
	@echo "  STORE=$(STORE)  logit store: local path or fsspec URL (s3://...); empty = $(CACHE_STORE) for cache-teacher, the last one written for the others"
	@echo "  TARGETS=$(TARGETS) (topk|sampled|topk+sampled)  TOPK=$(TOPK)  SAMPLES=$(SAMPLES) (draws per position)"
	@echo "  SAMPLE_TEMPERATURE=$(SAMPLE_TEMPERATURE)  temperature of the draws (empty = TEMPERATURE, else 1)"
	@echo "  SEQLEN=$(SEQLEN)  FORMAT=$(FORMAT) (zarr|arrow)"
	@echo "  MAX_TOKENS=$(MAX_TOKENS)  cap on cached corpus tokens (empty = whole corpus)"
	@echo "  EVAL_FRACTION=$(EVAL_FRACTION)  share of documents held out (teacher and store agree)"
	@echo "  THREADS=$(THREADS)  CPU threads of the default teacher's build and tune"
	@echo "  STUDENT=$(STUDENT)  preset (tiny|small|base), config .json/.yaml or HF dir"
	@echo "  STEPS=$(STEPS)  BATCH_SIZE=$(BATCH_SIZE)  LOSS=$(LOSS) (auto|kl|ghost|reverse-kl|sampled-kl|ce)  SEED=$(SEED)"
	@echo "  TEMPERATURE=$(TEMPERATURE)  ALPHA=$(ALPHA)  (empty = train-student's defaults)"
	@echo "  TRAIN_ARGS=$(TRAIN_ARGS)  extra train-student options for both students, e.g. --lr 2e-3"
	@echo "  OUT=$(OUT)  CE_OUT=$(CE_OUT)  KD and CE-only student dirs (replaced by train-student)"
	@echo "  SWEEP=$(SWEEP)  SWEEP_OUT=$(SWEEP_OUT)"
	@echo "  VENV=$(VENV)  PYTHON=$(PYTHON)  TORCH_INDEX=$(TORCH_INDEX)  PYTEST_ARGS=$(PYTEST_ARGS)"

install: $(STAMP) ## create the venv (VENV) with kdcache (editable), the dev and docs tools

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(HAS_CUDA),,$(BIN)/python -m pip install --quiet "$(TORCH_CPU)" \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
	$(BIN)/python -m pip install --quiet -e '.[dev,hf,track,docs]'
	@touch $@
	@echo "installed kdcache into $(VENV)"

teacher: $(DEFAULT_TEACHER)/config.json ## build the default teacher (tokenizer + small Llama) once

chat-teacher: $(CHAT_TEACHER)/config.json ## tune the default teacher on stdlib-chat's training split once

$(DEFAULT_TEACHER)/config.json: | install
	$(KDCACHE) build-teacher --corpus $(TEACHER_CORPUS) --out $(DEFAULT_TEACHER) --steps $(TEACHER_STEPS) \
		--eval-fraction $(EVAL_FRACTION) --threads $(THREADS) --force

# the held-out records (EVAL_FRACTION, the same hash split as cache-teacher's) stay untouched
$(CHAT_TEACHER)/config.json: $(DEFAULT_TEACHER)/config.json | install
	$(KDCACHE) build-teacher --from $(DEFAULT_TEACHER) --corpus stdlib-chat --out $(CHAT_TEACHER) \
		--seq-len $(SEQLEN) --eval-fraction $(EVAL_FRACTION) --threads $(THREADS) --force \
		$(if $(TUNE_STEPS),--steps $(TUNE_STEPS))

cache-teacher: install $(if $(TEACHER),,$(if $(CHAT_DEFAULT),chat-teacher,teacher)) ## cache the teacher's soft targets (TARGETS) into STORE (resumable)
	$(KDCACHE) cache-teacher --teacher $(CACHE_TEACHER_DIR) --corpus $(CORPUS) --out $(CACHE_STORE) \
		--targets $(TARGETS) $(if $(filter topk topk+sampled,$(TARGETS)),--top-k $(TOPK)) \
		$(if $(filter sampled topk+sampled,$(TARGETS)),--samples $(SAMPLES) \
			$(if $(SAMPLE_TEMPERATURE),--sample-temperature $(SAMPLE_TEMPERATURE))) \
		--seq-len $(SEQLEN) --format $(FORMAT) --eval-fraction $(EVAL_FRACTION) \
		$(if $(MAX_TOKENS),--max-tokens $(MAX_TOKENS))
	@mkdir -p $(dir $(LAST_STORE_FILE)) && echo "$(CACHE_STORE)" > $(LAST_STORE_FILE) && \
		echo "$(CACHE_TEACHER_DIR)" > $(LAST_TEACHER_FILE)

train-student: install ## train STUDENT with KD (OUT) and CE-only (CE_OUT), then compare
	@# replace earlier runs of this target (only directories that hold a train-student run)
	@for dir in $(OUT) $(CE_OUT); do if [ -f "$$dir/run.json" ]; then rm -rf "$$dir"; fi; done
	$(KDCACHE) train-student $(STUDENT_ARGS) --loss $(LOSS) --out $(OUT)
	$(KDCACHE) train-student $(STUDENT_ARGS) --loss ce --out $(CE_OUT)
	$(KDCACHE) compare --teacher $(TEACHER_DIR) --store $(READ_STORE) --kd $(OUT) --ce $(CE_OUT)

compare: install ## print the teacher / KD / CE-only table again
	$(KDCACHE) compare --teacher $(TEACHER_DIR) --store $(READ_STORE) --kd $(OUT) --ce $(CE_OUT)

sweep: install ## train the candidates of SWEEP from STORE into SWEEP_OUT
	$(KDCACHE) sweep --store $(READ_STORE) --config $(SWEEP) --out $(SWEEP_OUT)

test-minutes: install ## run the docs' blocks marked minutes and check their claims (KD beats CE-only), ~25 min; CI runs it
	$(BIN)/python -m pytest -m minutes $(PYTEST_ARGS)

lint: install ## ruff check + ruff format --check + mypy on storage/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint ## lint, then the whole pytest suite (no test collected = failure)
	@status=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "Error: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

# a venv made anew on every run, so nothing newer than a floor is left from an earlier one
FLOORS_VENV ?= build/floors-venv
FLOORS_BIN := $(FLOORS_VENV)/bin

test-floors: ## the tests marked floors, on every dependency at its declared minimum (FLOORS_VENV)
	rm -rf $(FLOORS_VENV) && $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_BIN)/python .ci/floors.py --extra dev --torch "$(TORCH_CPU)" > $(FLOORS_VENV)/floors.txt
	@cat $(FLOORS_VENV)/floors.txt
	$(FLOORS_BIN)/python -m pip install --quiet "$(TORCH_CPU)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(FLOORS_BIN)/python -m pip install --quiet -r $(FLOORS_VENV)/floors.txt
	@# --no-deps: the pins stay as they are, and pip check fails if they do not meet kdcache's own
	$(FLOORS_BIN)/python -m pip install --quiet --no-deps -e .
	$(FLOORS_BIN)/python -m pip check
	@status=0; $(FLOORS_BIN)/python -m pytest -m floors $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "Error: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

cli-reference: install ## regenerate docs/reference/cli.md's CLI reference from --help
	$(BIN)/python tests/test_cli_reference.py --write

# not `install`: a venv made by hand without the docs extras gets one line instead of a pip run
docs: ## build the documentation site into site/ (mkdocs build --strict)
	@test -x $(BIN)/mkdocs || { echo "Error: make docs needs the docs extras, not installed in $(VENV): make install, or $(BIN)/python -m pip install -e '.[docs]'" >&2; exit 2; }
	$(BIN)/mkdocs build --strict

bench: install ## run every bench/*.py, then assemble bench/RESULTS.md
	@set -e; for script in $(sort $(filter-out bench/report.py bench/_%.py,$(wildcard bench/*.py))); do \
		echo "== $$script"; $(BIN)/python $$script; done
	@echo "== bench/cache_overhead.py --torch-threads 1 (one core left to the pipeline)"
	$(BIN)/python bench/cache_overhead.py --torch-threads 1 --sizes 128x2,256x4
	@echo "== bench/fidelity.py --codec-twins (reuses the fidelity run's teacher and students)"
	$(BIN)/python bench/fidelity.py --codec-twins
	$(BIN)/python bench/report.py

fidelity: install ## only the fidelity benchmark (bench/fidelity.py, ~1 h): what each target kind keeps
	$(BIN)/python bench/fidelity.py
	$(BIN)/python bench/report.py

fidelity-codec: install ## the store codec's fidelity (bench/fidelity.py --codec-twins, ~40 min): gaps vs raw
	$(BIN)/python bench/fidelity.py --codec-twins
	$(BIN)/python bench/report.py

clean: ## remove artifacts/, runs/, site/ and caches (keeps the venv)
	rm -rf artifacts runs build dist site .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean ## clean, and remove the venv
	rm -rf $(VENV)
