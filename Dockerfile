# One image for the operator and its Jobs: postcode-operator, reader-job and
# enricher-job on PATH (see charts/postcode-operator).
#
#   docker build -t postcode-operator:0.1.0 .

FROM rust:1-bookworm AS builder
# aws-lc-sys (rustls' crypto provider) builds with cc and falls back to cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The root filesystem: the three binaries plus exactly the shared libraries ldd
# reports for them, and /etc/passwd naming user 65532. The test cluster's pod
# agent runs the Jobs from a root filesystem made by the same script.
RUN cargo build --release --locked --workspace --bins \
 && tools/image-rootfs.sh /out target/release/postcode-operator target/release/reader-job target/release/enricher-job

# Nothing but that root filesystem; non-root user 65532.
FROM scratch
COPY --from=builder /out/rootfs/ /
ENV PATH=/usr/local/bin
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["postcode-operator"]
CMD ["run"]
