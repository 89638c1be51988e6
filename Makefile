# Entry points; see README.md.
.PHONY: build test sample

build:
	cargo build --release --workspace --bins

# The whole test suite (starts PostgreSQL itself when needed).
test:
	bash .ci/test.sh

# Enrich the shipped sample offline.
sample: build
	./target/release/postcode-operator local samples/trips.csv --offline-postcodes samples/postcodes-sample.csv
