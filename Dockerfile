# weft's image: the agent (`weft`) and the CNI plugin (`weft-cni`), for deploy/weft.yml.
#
#   docker build -t weft:0.1.0 .
#
# Build stage: `cargo xtask setup` installs its list (xtask/src/requirements.rs) from Debian's
# apt (including bookworm-security's rustc-web with the prebuilt BPF `core`, LLVM 22, protoc
# and protobuf's .proto files) and bpf-linker from crates.io, then checks every entry; `cargo xtask build-ebpf` builds the eBPF object,
# which the agent embeds (an empty object would give an agent without its BPF dataplane:
# the build fails instead); then the two binaries are built with the image's rustup toolchain.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup \
 && cargo xtask build-ebpf \
 && test -s target/bpf/weft.bpf.o \
 && cargo build --release --locked -p weft --bins \
 && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p weft \
      --bin weft-cni --target x86_64-unknown-linux-gnu --target-dir target/static

# Runtime stage: the binaries and the tools the agent runs (nft, iptables with its
# nf_tables and legacy variants, ip for diagnostics).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 nftables iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# weft-cni is copied onto the host (/opt/cni/bin) and runs there: statically linked.
COPY --from=build /src/target/release/weft /usr/local/bin/
COPY --from=build /src/target/static/x86_64-unknown-linux-gnu/release/weft-cni /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/weft"]
CMD ["--help"]
