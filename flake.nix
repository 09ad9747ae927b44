{
  description = "KDS Lease Lab: Kinesis consumers with a coordinator-published lease limit, and the lab that proves it";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    crane.url = "github:ipetkov/crane";
  };

  outputs =
    { self, nixpkgs, crane }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The image name manifests/ run; `cargo xtask setup` sets the tag (see `image` below).
      imageName = "kds-worker";
      # rustup's and CI's Rust; the flake builds with nixpkgs' rustc (see devShell's warning).
      rustChannel = (builtins.fromTOML (builtins.readFile ./rust-toolchain.toml)).toolchain.channel;

      perSystem =
        pkgs:
        let
          inherit (pkgs) lib;
          craneLib = crane.mkLib pkgs;

          # Cargo sources plus what the tests read: manifests, the lab catalog, docs, CI.
          src = lib.cleanSourceWith {
            src = ./.;
            filter =
              path: type:
              (craneLib.filterCargoSources path type)
              || (lib.hasInfix "/manifests/" path)
              || (lib.hasInfix "/lab/" path)
              || (lib.hasInfix "/.ci/" path)
              || (lib.hasSuffix ".md" path)
              || (lib.hasSuffix "flake.lock" path)
              || (lib.hasSuffix "flake.nix" path);
          };

          commonArgs = {
            inherit src;
            strictDeps = true;
            pname = "kds-lease-lab";
            version = "0.1.0";
            # aws-lc-sys (rustls' crypto for kube and the AWS SDK) builds C with cmake.
            nativeBuildInputs = [
              pkgs.cmake
              pkgs.perl
            ];
            buildInputs = lib.optionals pkgs.stdenv.hostPlatform.isDarwin [ pkgs.libiconv ];
          };

          # One dependency build shared by every package and check.
          cargoArtifacts = craneLib.buildDepsOnly commonArgs;

          kds-worker = craneLib.buildPackage (
            commonArgs
            // {
              inherit cargoArtifacts;
              pname = "kds-worker";
              cargoExtraArgs = "--locked -p kds-worker";
              doCheck = false;
              meta.mainProgram = "kds-worker";
            }
          );

          xtask = craneLib.buildPackage (
            commonArgs
            // {
              inherit cargoArtifacts;
              pname = "xtask";
              cargoExtraArgs = "--locked -p xtask";
              doCheck = false;
              meta.mainProgram = "xtask";
            }
          );

          # kinesis-mock as npm publishes it (`kinesis-local`: a Scala.js build, no dependencies).
          kinesis-mock = pkgs.stdenvNoCC.mkDerivation {
            pname = "kinesis-mock";
            version = "0.6.2";
            src = pkgs.fetchurl {
              url = "https://registry.npmjs.org/kinesis-local/-/kinesis-local-0.6.2.tgz";
              hash = "sha512-mFlmksPMQP/A3nT22N2E8WzUbJcbEdxkCnhNCx2lHj20CW4vzuVH8zn5ByRg5LS5es8tvnx2mY1DpbZ5kw9PPQ==";
            };
            nativeBuildInputs = [ pkgs.makeWrapper ];
            installPhase = ''
              mkdir -p $out/lib/kinesis-mock $out/bin
              cp -r . $out/lib/kinesis-mock/
              makeWrapper ${lib.getExe pkgs.nodejs} $out/bin/kinesis-mock \
                --add-flags $out/lib/kinesis-mock/main.js \
                --set-default KINESIS_MOCK_CERT_PATH $out/lib/kinesis-mock/server.json
            '';
          };

          # moto's server mode (Flask) for DynamoDB: a Python with moto, which runs
          # lab/moto_serial.py (one request at a time; threaded moto_server's conditional
          # writes are not atomic).
          moto-server = pkgs.python3.withPackages (ps: [
            ps.moto
            ps.flask
            ps.flask-cors
          ]);

          # awslocal (PyPI awscli-local) is not in nixpkgs.
          awslocal = pkgs.python3Packages.buildPythonApplication rec {
            pname = "awscli-local";
            version = "0.23.0";
            pyproject = true;
            src = pkgs.fetchPypi {
              pname = "awscli_local";
              inherit version;
              hash = "sha256-WaoxGQ1XiWek03ZEAyCBDgD/19q7pdy56rauekxjNEE=";
            };
            build-system = [ pkgs.python3Packages.setuptools ];
            dependencies = [ pkgs.python3Packages.localstack-client ];
            makeWrapperArgs = [
              "--prefix"
              "PATH"
              ":"
              (lib.makeBinPath [ pkgs.awscli2 ])
            ];
            doCheck = false;
          };

          emulatorEnv = ''
            export HOME=$TMPDIR
            SHARD_LIMIT=100000 KINESIS_MOCK_PLAIN_PORT=14568 KINESIS_MOCK_TLS_PORT=14567 \
              ${lib.getExe' kinesis-mock "kinesis-mock"} > $TMPDIR/kinesis-mock.log 2>&1 &
            ${moto-server}/bin/python lab/moto_serial.py -H 127.0.0.1 -p 15000 > $TMPDIR/moto.log 2>&1 &
            for _ in $(seq 1 150); do
              (echo > /dev/tcp/127.0.0.1/14568 && echo > /dev/tcp/127.0.0.1/15000) 2>/dev/null && break
              sleep 0.2
            done
            export AWS_ENDPOINT_URL_KINESIS=http://127.0.0.1:14568
            export AWS_ENDPOINT_URL_DYNAMODB=http://127.0.0.1:15000
            export AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
            export AWS_EC2_METADATA_DISABLED=true
          '';

          # `nix build .#image && ./result | docker load` (or `minikube image load`). Linux only.
          image = pkgs.dockerTools.streamLayeredImage {
            name = imageName;
            # No fixed tag: Nix tags the image with a hash of its contents, so a rebuilt worker
            # gets a new tag and `cargo xtask setup` rolls the StatefulSet onto it (an
            # unchanged one keeps its tag and nothing restarts).
            tag = null;
            # ISO 8601 (what stream_layered_image.py parses), from the commit's time: the same
            # source gives the same image.
            created =
              let
                d = self.lastModifiedDate or "19700101000000";
                part = start: len: builtins.substring start len d;
              in
              "${part 0 4}-${part 4 2}-${part 6 2}T${part 8 2}:${part 10 2}:${part 12 2}Z";
            contents = [
              kds-worker
              pkgs.cacert
            ];
            # The StatefulSet runs as 65532 with a read-only root: nothing to write here.
            config = {
              Entrypoint = [ (lib.getExe kds-worker) ];
              User = "65532:65532";
              ExposedPorts."8080/tcp" = { };
              Env = [
                "PATH=${kds-worker}/bin"
                "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
              ];
            };
          };

          checks = {
            kds-clippy = craneLib.cargoClippy (
              commonArgs
                // {
                inherit cargoArtifacts;
                cargoClippyExtraArgs = "--all-targets -- -D warnings";
              }
            );
            kds-fmt = craneLib.cargoFmt {
              inherit src;
              pname = "kds-lease-lab";
              version = "0.1.0";
            };
            kds-doc = craneLib.cargoDoc (commonArgs // { inherit cargoArtifacts; });
            # Pure logic: policy, election, assignment (proptest), config (figment::Jail), xtask plans.
            kds-unit-tests = craneLib.cargoNextest (
              commonArgs
                // {
                inherit cargoArtifacts;
                cargoNextestExtraArgs = "--workspace --lib --bins";
              }
            );
            kds-manifests = craneLib.cargoNextest (
              commonArgs
                // {
                inherit cargoArtifacts;
                cargoNextestExtraArgs = "-p kds-worker --test it manifests::";
              }
            );
          }
          // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
            # The image script really streams a tarball (building it only writes the script).
            kds-image-streams = pkgs.runCommand "kds-image-streams" { } ''
              ${image} | tar -t > $out
            '';
            # The Linux build sandbox has a private loopback: the emulators run inside it.
            kds-emulator-tests = craneLib.cargoNextest (
              commonArgs
                // {
                inherit cargoArtifacts;
                cargoNextestExtraArgs = "-p kds-worker --tests --test-threads 2";
                preCheck = emulatorEnv;
              }
            );
          };

          packages = {
            inherit
              kds-worker
              xtask
              kinesis-mock
              awslocal
              ;
            default = kds-worker;
          }
          // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
            inherit image;
          };

          devShell = craneLib.devShell {
            inherit checks;
            packages = [
              pkgs.kubectl
              pkgs.minikube
              awslocal
              pkgs.awscli2
              pkgs.docker-client
              pkgs.kubeconform
              pkgs.rust-analyzer
              pkgs.cargo-nextest
              pkgs.nodejs
              moto-server
              kinesis-mock
              pkgs.nixpkgs-fmt
              pkgs.deadnix
            ];
            # `cargo xtask test` and the local lab use these instead of downloading.
            # A Python that can import moto: xtask runs lab/moto_serial.py with it.
            XTASK_MOTO_SERVER = "${moto-server}/bin/python";
            XTASK_KINESIS_MOCK_DIR = "${kinesis-mock}/lib/kinesis-mock";
            # Records the pinned tools' versions; `cargo xtask doctor` compares what is on PATH
            # later (outside the shell too) against them.
            shellHook = ''
              ${lib.optionalString (lib.versions.majorMinor pkgs.rustc.version != lib.versions.majorMinor rustChannel) ''
                echo "kds-lease-lab: warning: nixpkgs' rustc is ${pkgs.rustc.version}, rust-toolchain.toml pins ${rustChannel}: clippy may differ from CI's" >&2
              ''}
              mkdir -p .lab
              for t in "kubectl version --client" "minikube version --short" "awslocal --version" "node --version" "cargo --version"; do
                printf '%s\t%s\n' "''${t%% *}" "$($t 2>&1 | head -n 1)"
              done > .lab/flake-tools.tsv
              echo "kds-lease-lab: kubectl $(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | head -1), minikube $(minikube version --short 2>/dev/null), awslocal ${awslocal.version}, $(cargo --version | cut -d' ' -f1-2), node $(node --version), kinesis-mock ${kinesis-mock.version}"
            '';
          };
        in
        {
          inherit checks packages devShell;
          app = {
            type = "app";
            program = lib.getExe xtask;
          };
        };

      all = forAllSystems perSystem;
    in
    {
      checks = nixpkgs.lib.mapAttrs (_: s: s.checks) all;
      packages = nixpkgs.lib.mapAttrs (_: s: s.packages) all;
      devShells = nixpkgs.lib.mapAttrs (_: s: { default = s.devShell; }) all;
      apps = nixpkgs.lib.mapAttrs
        (_: s: {
          xtask = s.app;
          default = s.app;
        })
        all;
      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
