# replicator: `make test` and `make demo` work on a fresh Debian bookworm machine (as root they
# install what is missing: Debian packages via deploy/install-deps.sh, a venv with the package).

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
GUEST   ?= build/guest
STAMP   := $(VENV)/.installed

.PHONY: test test-fast demo bench bench-quick compare compare-quick busy disks disks-quick cost cost-quick roundtrip roundtrip-quick deps venv guest clean

$(STAMP): pyproject.toml
	@if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null \
	    || ! command -v busybox >/dev/null \
	    || ! command -v promtool >/dev/null || ! command -v chromium >/dev/null \
	    || ! { command -v libvirtd || test -x /usr/sbin/libvirtd; } >/dev/null \
	    || ! command -v virsh >/dev/null || ! command -v pkg-config >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then bash deploy/install-deps.sh; \
	  else echo "missing system packages: run 'sudo bash deploy/install-deps.sh'" >&2; exit 1; fi; \
	fi
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

deps venv: $(STAMP)

$(GUEST)/vmlinux $(GUEST)/initramfs.cpio.gz: deploy/build-guest.sh deploy/guest/guestload.c | $(STAMP)
	bash deploy/build-guest.sh $(GUEST)

guest: $(GUEST)/vmlinux

test: $(STAMP) guest
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not qemu"

demo: $(STAMP) guest
	$(BIN)/replicator demo --round-trip

bench: $(STAMP) guest          # root: network namespaces + tc; ~25 min
	$(BIN)/python -m bench.stream
	$(BIN)/python -m bench.compare --out bench/RESULTS.md

bench-quick: $(STAMP) guest    # ~5 min
	$(BIN)/python -m bench.stream --quick
	$(BIN)/python -m bench.compare --quick

compare: $(STAMP) guest
	$(BIN)/python -m bench.compare --out bench/RESULTS.md

compare-quick: $(STAMP) guest
	$(BIN)/python -m bench.compare --quick

busy: $(STAMP) guest           # root: a guest dirtying 0.5x, 1x, 3x the link; ~5 min
	$(BIN)/python -m bench.busy --out bench/RESULTS-busy.md

disks: $(STAMP) guest          # root: a VM with a 4 GiB disk vs QEMU's storage migration; ~30 min
	$(BIN)/python -m bench.disks --out bench/RESULTS-disks.md

disks-quick: $(STAMP) guest    # root: 256 MiB disk, loopback; ~2 min
	$(BIN)/python -m bench.disks --quick

cost: $(STAMP) guest           # root: the cost of staying warm (CPU, wire, stream); ~6 min
	$(BIN)/python -m bench.cost --out bench/RESULTS-cost.md

cost-quick: $(STAMP) guest     # root: 512 MiB guest, 12 s windows; report on stdout; ~4 min
	$(BIN)/python -m bench.cost --quick

roundtrip: $(STAMP) guest      # root: there and back (60 s away, 2 + 20 MiB/s) vs QEMU back in full; ~11 min
	$(BIN)/python -m bench.roundtrip --out bench/RESULTS-roundtrip.md

roundtrip-quick: $(STAMP) guest # root: 512 MiB, 20 s away, 2 MiB/s; table on stdout; ~3 min
	$(BIN)/python -m bench.roundtrip --quick

clean:
	rm -rf $(VENV) build .pytest_cache
