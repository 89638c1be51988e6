# Entry points; see README.md.
.PHONY: build lint test e2e sample bench

build:
	cargo build --release --workspace --bins

# Formatting and lints, as CI runs them (rustfmt.toml, clippy.toml, [workspace.lints]).
lint:
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings

# The whole test suite (starts PostgreSQL itself when needed).
test:
	bash .ci/test.sh

# Enrich the shipped sample offline.
sample: build
	./target/release/postcode-operator local samples/trips.csv --offline-postcodes samples/postcodes-sample.csv

# The operator end to end on a real API server with the real 100,000-row file.
e2e:
	bash .ci/e2e.sh

# Benchmarks against psql \copy, sqlite3 .import, scipy and the quota floor; writes BENCHMARKS.md.
bench:
	bash bench/run.sh
