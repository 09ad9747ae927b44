# Evaluates flake.nix's outputs without nixpkgs or crane (no binary cache, no GitHub here):
# every function the flake calls is a stand-in that checks its arguments the way the real one
# would fail or warn, and records them. `cargo xtask test` runs
#   nix-instantiate --eval --strict --json xtask/flake-eval.nix --arg flakeFile ./flake.nix
# and asserts on the summary. A typo in an argument name, a missing pname/version, a `created`
# that stream_layered_image.py cannot parse, or a reference to a missing attribute fails here.
{
  # Another copy of flake.nix (the check also evaluates broken copies, which must fail).
  flakeFile ? ../flake.nix,
}:
let
  flake = import flakeFile;

  fail = what: msg: throw "flake-eval: ${what}: ${msg}";

  # Every argument must be one the real function takes; `required` ones must be present.
  checkArgs =
    what: allowed: required: args:
    let
      unknown = builtins.filter (a: !(builtins.elem a allowed)) (builtins.attrNames args);
      missing = builtins.filter (a: !(args ? ${a})) required;
    in
    if unknown != [ ] then
      fail what "unknown argument(s) ${builtins.toJSON unknown}"
    else if missing != [ ] then
      fail what "missing argument(s) ${builtins.toJSON missing}"
    else
      args;

  drv = kind: name: args: {
    type = "derivation";
    inherit kind name args;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    drvPath = "/nix/store/00000000000000000000000000000000-${name}.drv";
    meta = args.meta or { };
    version = args.version or "";
  };
  named = args: args.name or "${args.pname}-${args.version}";

  lib = rec {
    versions.majorMinor =
      v:
      let
        m = builtins.match "([0-9]+)\\.([0-9]+).*" v;
      in
      if m == null then fail "lib.versions.majorMinor" "${v} is not a version" else "${builtins.elemAt m 0}.${builtins.elemAt m 1}";
    optionalString = c: s: if c then s else "";
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    mapAttrs = builtins.mapAttrs;
    optionals = c: l: if c then l else [ ];
    optionalAttrs = c: a: if c then a else { };
    hasInfix = infix: s: builtins.match ".*${escapeRegex infix}.*" s != null;
    hasSuffix =
      suffix: s:
      let
        ls = builtins.stringLength s;
        lx = builtins.stringLength suffix;
      in
      ls >= lx && builtins.substring (ls - lx) lx s == suffix;
    escapeRegex = builtins.replaceStrings [ "." "/" "+" ] [ "\\." "/" "\\+" ];
    makeBinPath = ps: builtins.concatStringsSep ":" (map (p: "${p}/bin") ps);
    getExe =
      p:
      if p ? meta.mainProgram || p ? pname || p ? name then
        "${p}/bin/${p.meta.mainProgram or p.pname or p.name}"
      else
        fail "lib.getExe" "not a package";
    getExe' = p: bin: "${p}/bin/${bin}";
    cleanSourceWith =
      args:
      checkArgs "lib.cleanSourceWith" [ "src" "filter" "name" ] [ "src" ] args
      // {
        outPath = "/nix/store/00000000000000000000000000000000-source";
      };
  };

  # Arguments mkDerivation-style builders accept beyond their own (environment variables
  # included: any name is allowed by stdenv, so only the builders' own keys are checked).
  stdenvArgs = [
    "pname"
    "version"
    "name"
    "src"
    "nativeBuildInputs"
    "buildInputs"
    "installPhase"
    "buildPhase"
    "meta"
    "strictDeps"
    "doCheck"
    "preCheck"
    "passthru"
  ];
  # crane's documented arguments (lib/mkCargoDerivation.nix and friends) used by this flake.
  craneArgs = stdenvArgs ++ [
    "cargoArtifacts"
    "cargoExtraArgs"
    "cargoClippyExtraArgs"
    "cargoNextestExtraArgs"
    "cargoDocExtraArgs"
    "cargoTestExtraArgs"
    "cargoVendorDir"
    "cargoLock"
  ];
  # Without pname and version crane reads Cargo.toml and warns on every evaluation.
  crane = what: args: drv "crane.${what}" (named (checkArgs "craneLib.${what}" craneArgs [ "pname" "version" ] args)) args;

  mkPkgs =
    system:
    let
      isDarwin = builtins.match ".*-darwin" system != null;
      pkg = name: drv "package" name { meta.mainProgram = name; };
      pythonPackages = {
        moto = pkg "moto";
        flask = pkg "flask";
        flask-cors = pkg "flask-cors";
        setuptools = pkg "setuptools";
        localstack-client = pkg "localstack-client";
        buildPythonApplication =
          args:
          drv "python-application" (named (
            checkArgs "buildPythonApplication"
              (
                stdenvArgs
                ++ [
                  "pyproject"
                  "build-system"
                  "dependencies"
                  "makeWrapperArgs"
                ]
              )
              [ "pname" "version" "src" ]
              args
          )) args;
      };
    in
    {
      inherit lib;
      rustc = pkg "rustc" // {
        version = "1.95.0";
      };
      stdenv.hostPlatform = {
        inherit isDarwin;
        isLinux = !isDarwin;
      };
      stdenvNoCC.mkDerivation = args: drv "mkDerivation" (named (checkArgs "stdenvNoCC.mkDerivation" stdenvArgs [ ] args)) args;
      runCommand =
        name: env: script:
        if builtins.isString script then
          drv "runCommand" name { inherit env script; }
        else
          fail "runCommand ${name}" "the script is not a string";
      fetchurl = args: drv "fetchurl" "fetched" (checkArgs "fetchurl" [ "url" "hash" "name" ] [ "url" "hash" ] args);
      fetchPypi = args: drv "fetchPypi" "fetched" (checkArgs "fetchPypi" [ "pname" "version" "hash" "format" ] [ "pname" "version" "hash" ] args);
      python3 = pkg "python3" // {
        withPackages = f: drv "python-env" "python3-env" { packages = f pythonPackages; };
      };
      python3Packages = pythonPackages;
      dockerTools.streamLayeredImage =
        args:
        let
          a =
            checkArgs "dockerTools.streamLayeredImage"
              [
                "name"
                "tag"
                "created"
                "contents"
                "config"
                "fromImage"
                "maxLayers"
                "extraCommands"
                "fakeRootCommands"
                "includeStorePaths"
                "architecture"
                "meta"
                "passthru"
                "mtime"
              ]
              [ "name" ]
              args;
          created = a.created or "1970-01-01T00:00:01Z";
          # stream_layered_image.py: "now" or datetime.fromisoformat.
          iso = builtins.match "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})?" created;
        in
        if created != "now" && iso == null then
          fail "dockerTools.streamLayeredImage" "created = ${builtins.toJSON created} is not ISO 8601"
        else
          drv "streamLayeredImage" "stream-${a.name}" a;
    }
    // builtins.listToAttrs (
      map
        (n: {
          name = n;
          value = pkg n;
        })
        [
          "cmake"
          "perl"
          "libiconv"
          "cacert"
          "nodejs"
          "makeWrapper"
          "kubectl"
          "minikube"
          "awscli2"
          "docker-client"
          "kubeconform"
          "rust-analyzer"
          "cargo-nextest"
          "nixpkgs-fmt"
          "deadnix"
        ]
    );

  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs [
      "x86_64-linux"
      "aarch64-linux"
      "x86_64-darwin"
      "aarch64-darwin"
    ] mkPkgs;
  };

  craneInput.mkLib = _pkgs: {
    filterCargoSources =
      path: _type:
      lib.hasSuffix ".rs" path || lib.hasSuffix ".toml" path || lib.hasSuffix "Cargo.lock" path;
    buildDepsOnly = crane "buildDepsOnly";
    buildPackage = crane "buildPackage";
    cargoClippy = crane "cargoClippy";
    cargoDoc = crane "cargoDoc";
    cargoNextest = crane "cargoNextest";
    # cargoFmt takes only src and stdenv arguments; pname/version silence its warning.
    cargoFmt = args: drv "crane.cargoFmt" (named (checkArgs "craneLib.cargoFmt" stdenvArgs [ "pname" "version" "src" ] args)) args;
    # A mkShell: any attribute becomes an environment variable; checks and packages are lists.
    devShell =
      args:
      if !(builtins.isList args.packages) then
        fail "craneLib.devShell" "packages is not a list"
      else
        drv "devShell" "devshell" args;
  };

  self = {
    lastModifiedDate = "20261128093000";
    lastModified = 1795858200;
    outPath = toString ../.;
  };

  out = flake.outputs {
    inherit self nixpkgs;
    crane = craneInput;
  };

  summary = system: {
    checks = builtins.attrNames out.checks.${system};
    packages = builtins.attrNames out.packages.${system};
    image = if out.packages.${system} ? image then {
      inherit (out.packages.${system}.image.args) name created;
      tag = out.packages.${system}.image.args.tag or null;
      env = out.packages.${system}.image.args.config.Env;
      entrypoint = out.packages.${system}.image.args.config.Entrypoint;
    } else null;
    devShell = builtins.attrNames out.devShells.${system}.default.args;
    app = out.apps.${system}.default.program;
    formatter = out.formatter.${system}.name;
  };
in
builtins.deepSeq out {
  inputs = builtins.attrNames flake.inputs;
  systems = builtins.attrNames out.packages;
  x86_64-linux = summary "x86_64-linux";
  aarch64-darwin = summary "aarch64-darwin";
}
