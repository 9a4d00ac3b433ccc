# make test  : everything, from a bare Debian machine (apt packages, venvs, OpenBao, VM kernel)
# make demo  : the dashboard's unlock flow against a real kernel in a VM
# make bench : the benchmarks behind BENCHMARKS.md
SHELL := /bin/bash
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV := .venv
# The VM's services run as unprivileged users, who cannot enter /root: this venv lives outside it.
VM_PREFIX ?= /opt/luksctl-test
PYTEST_ARGS ?=
BENCH ?=

.PHONY: test test-host test-vm demo bench lock deps vm-prefix clean mutants

# The host suites run while the systemd boot, the longest, starts (scripts/vm-test.sh): about 4
# minutes off the total. `make test-host` and `make test-vm` still run alone.
test: vm-prefix
	VM_PREFIX=$(VM_PREFIX) PYTHON=$(PYTHON) HOST_TESTS='$(MAKE) --no-print-directory test-host' scripts/vm-test.sh $(PYTEST_ARGS)

deps:
	scripts/install-host-deps.sh

$(VENV)/.stamp: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[server,test,vm]'
	touch $@

# A skip, an xfail or an xpass fails this run too, unless ALLOWED_SKIPS in tests/conftest.py names
# the test (tests/run_policy.py).
test-host: $(VENV)/.stamp
	$(VENV)/bin/pytest tests/unit tests/api tests/vault tests/contract $(PYTEST_ARGS)

# The package is installed (not linked) so the guest runs exactly what was built from this tree.
vm-prefix: $(VENV)/.stamp
	scripts/build-vm-prefix.sh $(VM_PREFIX) $(PYTHON)

# Four boots (scripts/vm-test.sh): virtme's init (most tests), then the power-cut pair (a hard
# reset with setups and rotations stopped at each step and an online re-encryption mid-way, then
# each command again), and beside them systemd as
# PID 1 (the unit files, install.sh, the Ansible role, docker and NFS restarts).
test-vm: vm-prefix
	VM_PREFIX=$(VM_PREFIX) PYTHON=$(PYTHON) scripts/vm-test.sh $(PYTEST_ARGS)

demo: vm-prefix
	VM_PREFIX=$(VM_PREFIX) scripts/vm-run.sh demo

# BENCH picks the VM benchmarks and their knobs, e.g. BENCH="SOAK_SECONDS=20 bench_soak".
# The host benchmarks run last: vm-run.sh starts by emptying vm-out/. bench_status.py runs
# natively too: the same serving configurations without emulation, for comparison. The CLI's
# start-up is timed natively on the venv the VM runs (installed, as install.sh does, not linked).
bench: vm-prefix
	VM_PREFIX=$(VM_PREFIX) scripts/vm-run.sh bench $(BENCH)
	$(VENV)/bin/python scripts/bench_fanout.py
	$(VENV)/bin/python scripts/bench_status.py
	scripts/bench_startup.sh $(VM_PREFIX)/venv/bin/luksctl

# requirements.lock: pyproject.toml's runtime dependencies (the services': the `server` extra) pinned with hashes, for Debian's python3
# (what install.sh uses); requirements-build.lock: its build backend, which install.sh builds luksctl
# with. pip-tools runs in a throwaway venv, so it is no dependency of the project.
lock:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && $(PYTHON) -m venv "$$tmp" && \
	"$$tmp/bin/pip" install -q pip-tools && \
	"$$tmp/bin/pip-compile" --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links --extra server --output-file requirements.lock pyproject.toml && \
	"$$tmp/bin/pip-compile" --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links --allow-unsafe \
		--build-deps-for wheel --only-build-deps --output-file requirements-build.lock pyproject.toml

# Mutation testing (mutmut; [tool.mutmut] in pyproject.toml), not part of `make test`: every
# module listed there, or only MUTANTS (e.g. MUTANTS=src/luksctl/root/rotate.py), at the lowest CPU
# priority. A run of every module resumes where an interrupted one stopped (mutants/ keeps the
# results); MUTANTS re-tests its modules. Prints the score of what was run;
# tests/mutants-survivors.md lists each survivor with its reason.
MUTANTS ?=
mutants: $(VENV)/.stamp
	$(VENV)/bin/pip install -q -e '.[mutants]'
	nice -n 19 $(VENV)/bin/mutmut run --max-children 2 $(foreach m,$(MUTANTS),'$(subst /,.,$(patsubst src/%.py,%,$(m))).*')
	$(VENV)/bin/mutmut results --all true | $(VENV)/bin/python scripts/mutants-score.py tests/mutants-survivors.md $(MUTANTS)

clean:
	rm -rf $(VENV) vm-out vm-out-systemd vm-out-systemd.console.log vm-out-powercut vm-out-powercut.console.log build src/*.egg-info mutants
