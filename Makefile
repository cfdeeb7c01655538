# svcplane: `make lab` walks examples/lab live in every proxy mode; `make test` runs every check.
.PHONY: lab test deps fmt clippy unit test-ipvs build release

CARGO ?= cargo

deps:
	@scripts/install-deps.sh

lab: deps
	@scripts/lab.sh $(ARGS)

build:
	$(CARGO) build --workspace --all-targets

release:
	$(CARGO) build --release -p svcplane

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# A hung test fails the run within 40 minutes (build included) instead of stalling CI.
unit:
	timeout --kill-after=30 2400 $(CARGO) test --workspace

# IPVS needs a kernel this machine lacks: Debian's stock kernel under QEMU (README: Development).
test-ipvs: deps
	@scripts/test-ipvs.sh

test: deps fmt clippy unit test-ipvs
