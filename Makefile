# Shortcuts; `make ci` runs exactly what CI runs.
.PHONY: ci setup test demo bench fmt lint

ci:
	bash .ci/run

setup:
	scripts/setup.sh

test:
	scripts/test.sh

demo:
	scripts/demo.sh

bench:
	scripts/bench-mirror.sh

fmt:
	cargo fmt --all

lint:
	cargo clippy --all-targets --locked -- -D warnings
