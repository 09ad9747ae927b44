# The worker image without Nix (`cargo xtask setup` uses `nix build .#image` when Nix is
# installed). Same user, entrypoint and tag as the Nix image: see flake.nix.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY worker worker
COPY xtask xtask
RUN cargo build --release --locked -p kds-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kds-worker /usr/local/bin/kds-worker
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["kds-worker"]
