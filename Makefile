# Everyday commands. `make demo` and `make test` install into .venv first when needed.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# No telemetry from any tool, here or in CI.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1

.PHONY: install data demo pipeline check-backbone test test-fast lint clean

$(INSTALLED): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# DeepSpeed compiles its CPU shared-memory collective on first use (~20 s, g++ + ninja): do it once here
	$(PYTHON) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	# Fashion-MNIST, the real images of the tests and the default pipeline: Debian's package, else torchvision's download
	$(PYTHON) -m dinov2.data.fashion_mnist
	# Debian's chromium + chromedriver for the UI tests (a few seconds; one line and on where apt-get cannot run)
	@bash infra/install-browser.sh
	touch $@

install: $(INSTALLED)

# Provide Fashion-MNIST again (a venv installed before the data step, or data/ removed).
data: $(INSTALLED)
	$(PYTHON) -m dinov2.data.fashion_mnist

# The whole system on the embedded default data: curation -> pretraining -> distillation -> evaluation
# -> report (`dvc repro` under one parent MLflow run; outputs/report/report.html at the end).
demo: install pipeline

pipeline: install
	@start=$$(date +%s); $(VENV)/bin/dinov2 pipeline; code=$$?; \
	echo "pipeline: $$(( $$(date +%s) - start )) s; report in outputs/report/report.html"; exit $$code

# A backbone embeds real photos, is exported, reloads and gives the same features (random init by default).
check-backbone: install
	$(VENV)/bin/dinov2 demo --out outputs/demo

test: install
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Local services for one person under supervisord (Prefect server + workers, MLflow server; state in
# outputs/services/). `make status`: one line per program, fails when one is not healthy.
.PHONY: up down status
up: install
	$(PYTHON) -m flows.services up

down:
	$(PYTHON) -m flows.services down

status:
	$(PYTHON) -m flows.services status

# Removes what runs produce (outputs/, runs/, the training checkpoints); the DVC cache and remote stay.
clean:
	rm -rf outputs runs checkpoints .pytest_cache
