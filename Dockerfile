# The worker image without Nix (`cargo xtask setup` uses `nix build .#image` when Nix is
# installed). Same user and entrypoint as the Nix image (flake.nix); `setup` tags it with the
# start of its image id, so a rebuilt worker rolls out and an unchanged one does not.
# The Rust version is rust-toolchain.toml's.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY model model
COPY worker worker
COPY xtask xtask
RUN cargo build --release --locked -p kds-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kds-worker /usr/local/bin/kds-worker
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["kds-worker"]
