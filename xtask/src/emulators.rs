//! The pinned emulators (`lab/emulators.toml`): installed into `.lab/tools/` on first use,
//! started on free loopback ports, stopped when the guard is dropped (also on failure).
//!
//! - Kinesis: kinesis-mock (npm `kinesis-local`), run with Node.js.
//! - DynamoDB: moto server (PyPI `moto[server]`), in its own virtualenv, started through
//!   `lab/moto_serial.py` so that it serves one request at a time.
//!
//! Why moto is serialised: `moto_server` handles each request on its own thread, and moto's
//! DynamoDB does not make a conditional write's check and write atomic across threads. Threaded,
//! four racing conditional UpdateItems on one item had two or more winners in 33 of 150 trials,
//! and racing transactions both applied or failed with HTTP 500: the emulator would let tests
//! pass or fail on races real DynamoDB never loses (the worker's election and leases are
//! conditional writes). One request at a time, it is linearizable (0 of 150);
//! `worker/tests/it/emulator_conformance.rs` fails if it ever stops being.
//!
//! `XTASK_MOTO_SERVER` (set by the Nix dev shell) replaces the virtualenv: it names a Python
//! interpreter that can import moto (with its server extras), not a `moto_server` binary.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;
use xshell::{Shell, cmd};

use crate::process::Launch;
use crate::util::{free_port, http_status, lab_dir, project_root, secs, tools_dir};

#[derive(Debug, Deserialize)]
pub struct Pins {
    pub kinesis: KinesisPin,
    pub dynamodb: DynamoPin,
}

#[derive(Debug, Deserialize)]
pub struct KinesisPin {
    pub npm_package: String,
    pub version: String,
    pub shard_limit: u64,
    pub update_shard_count_duration: String,
}

#[derive(Debug, Deserialize)]
pub struct DynamoPin {
    pub pip_package: String,
    pub version: String,
}

pub fn pins_path() -> PathBuf {
    project_root().join("lab/emulators.toml")
}

pub fn load_pins() -> anyhow::Result<Pins> {
    let path = pins_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn kinesis_dir(pins: &Pins) -> PathBuf {
    tools_dir().join(format!("kinesis-mock-{}", pins.kinesis.version))
}

/// kinesis-mock's `main.js` (its `server.json` lies beside it): in `XTASK_KINESIS_MOCK_DIR`
/// when set (`nix develop` points it at the flake's copy), else in the installed package.
fn kinesis_main(pins: &Pins) -> PathBuf {
    match std::env::var_os("XTASK_KINESIS_MOCK_DIR") {
        Some(dir) => PathBuf::from(dir).join("main.js"),
        None => kinesis_dir(pins)
            .join("node_modules")
            .join(&pins.kinesis.npm_package)
            .join("main.js"),
    }
}

fn moto_venv(pins: &Pins) -> PathBuf {
    tools_dir().join(format!("moto-{}", pins.dynamodb.version))
}

/// The Python that runs `lab/moto_serial.py`: `XTASK_MOTO_SERVER`, else the virtualenv's.
pub fn moto_python(pins: &Pins) -> anyhow::Result<PathBuf> {
    let Some(python) = std::env::var_os("XTASK_MOTO_SERVER") else {
        return Ok(moto_venv(pins).join("bin").join("python"));
    };
    let python = PathBuf::from(python);
    // It used to name `moto_server`, which would take the launcher for an argument and serve
    // threaded: refuse rather than run a non-linearizable DynamoDB.
    if python
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("moto_server"))
    {
        bail!(
            "XTASK_MOTO_SERVER={} names moto_server; it must name a Python interpreter that can \
             import moto (e.g. <venv>/bin/python), which runs lab/moto_serial.py",
            python.display()
        );
    }
    Ok(python)
}

/// The launcher that serves moto one request at a time (see the module docs).
pub fn moto_launcher() -> PathBuf {
    project_root().join("lab/moto_serial.py")
}

fn require_tool(sh: &Shell, tool: &str, why: &str) -> anyhow::Result<()> {
    if cmd!(sh, "{tool} --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        bail!(
            "`{tool}` not found: it is needed {why}. Enter `nix develop`, or install it (Debian: apt-get install {tool})"
        );
    }
    Ok(())
}

/// Written last by a successful install: an interrupted one is redone, never used half-made.
const INSTALLED_MARKER: &str = ".installed";

/// Installs whichever pinned emulator is missing. Idempotent and quick when installed.
pub fn install(sh: &Shell, pins: &Pins) -> anyhow::Result<()> {
    let dir = kinesis_dir(pins);
    if std::env::var_os("XTASK_KINESIS_MOCK_DIR").is_none() && !dir.join(INSTALLED_MARKER).is_file()
    {
        require_tool(sh, "npm", "to install kinesis-mock")?;
        let spec = format!("{}@{}", pins.kinesis.npm_package, pins.kinesis.version);
        eprintln!("installing {spec} (kinesis-mock) into {}", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        cmd!(
            sh,
            "npm install --no-audit --no-fund --no-save --prefix {dir} {spec}"
        )
        .quiet()
        .run()
        .context("npm install of kinesis-mock failed")?;
        if !kinesis_main(pins).is_file() {
            bail!(
                "npm installed {spec} but {} is missing",
                kinesis_main(pins).display()
            );
        }
        std::fs::write(dir.join(INSTALLED_MARKER), &spec)?;
    }
    let venv = moto_venv(pins);
    if std::env::var_os("XTASK_MOTO_SERVER").is_none() && !venv.join(INSTALLED_MARKER).is_file() {
        require_tool(sh, "python3", "to install the moto server")?;
        let spec = format!("{}=={}", pins.dynamodb.pip_package, pins.dynamodb.version);
        eprintln!(
            "installing {spec} (DynamoDB emulator) into {}",
            venv.display()
        );
        let _ = std::fs::remove_dir_all(&venv);
        cmd!(sh, "python3 -m venv {venv}")
            .quiet()
            .run()
            .context("python3 -m venv failed (Debian: apt-get install python3-venv)")?;
        let pip = venv.join("bin/pip");
        cmd!(
            sh,
            "{pip} install --quiet --disable-pip-version-check {spec}"
        )
        .quiet()
        .run()
        .context("pip install of the moto server failed")?;
        std::fs::write(venv.join(INSTALLED_MARKER), &spec)?;
    }
    Ok(())
}

/// Running emulators; both processes are killed when this is dropped.
pub struct Emulators {
    pub kinesis: SocketAddr,
    pub dynamodb: SocketAddr,
    handles: Vec<duct::Handle>,
    detached: bool,
}

impl Emulators {
    pub fn kinesis_url(&self) -> String {
        format!("http://{}", self.kinesis)
    }

    pub fn dynamodb_url(&self) -> String {
        format!("http://{}", self.dynamodb)
    }

    /// The standard AWS SDK settings that point any AWS client at these emulators.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        aws_env(&self.kinesis_url(), &self.dynamodb_url())
    }

    pub fn stop(mut self) {
        self.kill_all();
    }

    /// These emulators' DynamoDB beside another Kinesis endpoint (a view: dropping it stops
    /// nothing).
    pub fn with_kinesis(&self, kinesis: SocketAddr) -> Emulators {
        Emulators {
            kinesis,
            dynamodb: self.dynamodb,
            handles: Vec::new(),
            detached: false,
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.handles.iter().flat_map(|h| h.pids()).collect()
    }

    fn kill_all(&mut self) {
        for h in self.handles.drain(..) {
            let _ = h.kill();
        }
    }
}

impl Drop for Emulators {
    fn drop(&mut self) {
        if self.detached {
            // duct's Handle does not kill on drop; leaving them is the point.
            self.handles.clear();
        } else {
            self.kill_all();
        }
    }
}

/// Installs if needed, starts both emulators on free ports, waits until they answer. They stop
/// when the returned guard is dropped.
pub fn start(sh: &Shell, logs: &Path) -> anyhow::Result<Emulators> {
    spawn(sh, logs, false)
}

/// Like [`start`], but the emulators outlive this process (the local lab): in their own
/// process group, never killed by the guard.
pub fn start_detached(sh: &Shell, logs: &Path) -> anyhow::Result<Emulators> {
    let mut emu = spawn(sh, logs, true)?;
    emu.detached = true;
    Ok(emu)
}

fn spawn(sh: &Shell, logs: &Path, detach: bool) -> anyhow::Result<Emulators> {
    let pins = load_pins()?;
    install(sh, &pins)?;
    std::fs::create_dir_all(logs)?;

    // Resolved first: a failure after kinesis-mock started would leave it running.
    let moto_python = moto_python(&pins)?;
    let launcher = moto_launcher();
    if !launcher.is_file() {
        bail!("{} is missing", launcher.display());
    }

    let kinesis_port = free_port()?;
    let kinesis_tls_port = free_port()?;
    let dynamodb_port = free_port()?;
    let main_js = kinesis_main(&pins);
    let cert = main_js.with_file_name("server.json");
    let group = |l: Launch| if detach { l.own_process_group() } else { l };
    let kinesis = group(
        Launch::new("node", [&main_js])
            .env("KINESIS_MOCK_PLAIN_PORT", kinesis_port.to_string())
            .env("KINESIS_MOCK_TLS_PORT", kinesis_tls_port.to_string())
            .env("KINESIS_MOCK_CERT_PATH", cert.display().to_string())
            .env("SHARD_LIMIT", pins.kinesis.shard_limit.to_string())
            .env(
                "UPDATE_SHARD_COUNT_DURATION",
                &pins.kinesis.update_shard_count_duration,
            )
            .env("LOG_LEVEL", "WARN")
            .log(logs.join("kinesis-mock.log"), false),
    )
    .start()
    .context("starting kinesis-mock with node")?;
    let moto = group(moto_launch(
        &moto_python,
        dynamodb_port,
        &logs.join("moto.log"),
    ))
    .start()
    .with_context(|| {
        format!(
            "starting moto with {} {}",
            moto_python.display(),
            launcher.display()
        )
    })?;
    let emulators = Emulators {
        kinesis: ([127, 0, 0, 1], kinesis_port).into(),
        dynamodb: ([127, 0, 0, 1], dynamodb_port).into(),
        handles: vec![kinesis, moto],
        detached: false,
    };
    wait_healthy(
        "kinesis-mock",
        emulators.kinesis,
        "/healthcheck",
        &logs.join("kinesis-mock.log"),
        &emulators.handles[0],
    )?;
    wait_healthy(
        "moto (DynamoDB)",
        emulators.dynamodb,
        "/",
        &logs.join("moto.log"),
        &emulators.handles[1],
    )?;
    Ok(emulators)
}

/// moto on `port`, serving one request at a time (`lab/moto_serial.py`).
fn moto_launch(python: &Path, port: u16, log: &Path) -> Launch {
    let args: [OsString; 5] = [
        moto_launcher().into(),
        "-H".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string().into(),
    ];
    Launch::new(python, args).log(log, false)
}

/// A second moto, serving Kinesis, for streams larger than kinesis-mock creates (it refuses
/// more than 1,000 shards at once and 1,000 -> 2,000 by resharding); moto creates 2,000 at
/// once and lists them in one page. Stopped when dropped.
pub struct MotoKinesis {
    pub addr: SocketAddr,
    handle: duct::Handle,
}

impl MotoKinesis {
    pub fn start(sh: &Shell, logs: &Path) -> anyhow::Result<MotoKinesis> {
        let pins = load_pins()?;
        install(sh, &pins)?;
        std::fs::create_dir_all(logs)?;
        let python = moto_python(&pins)?;
        let port = free_port()?;
        let log = logs.join("moto-kinesis.log");
        let handle = moto_launch(&python, port, &log)
            .start()
            .with_context(|| format!("starting moto (Kinesis) with {}", python.display()))?;
        let moto = MotoKinesis {
            addr: ([127, 0, 0, 1], port).into(),
            handle,
        };
        wait_healthy("moto (Kinesis)", moto.addr, "/", &log, &moto.handle)?;
        Ok(moto)
    }
}

impl Drop for MotoKinesis {
    fn drop(&mut self) {
        let _ = self.handle.kill();
    }
}

fn wait_healthy(
    name: &str,
    addr: SocketAddr,
    path: &str,
    log: &Path,
    handle: &duct::Handle,
) -> anyhow::Result<()> {
    const DEADLINE: Duration = Duration::from_secs(60);
    let start = Instant::now();
    eprint!("waiting for {name} on {addr} ...");
    loop {
        if http_status(addr, path) == Some(200) {
            eprintln!(" ready in {}", secs(start.elapsed()));
            return Ok(());
        }
        if let Ok(Some(out)) = handle.try_wait() {
            eprintln!();
            bail!(
                "{name} exited ({:?}) before answering; last log lines:\n{}",
                out.status,
                tail(log, 20)
            );
        }
        if start.elapsed() > DEADLINE {
            eprintln!();
            bail!(
                "{name} did not answer GET {path} on {addr} within {}; last log lines:\n{}",
                secs(DEADLINE),
                tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `cargo xtask emulators`: run them until Ctrl-C (for running tests from an IDE).
pub fn foreground() -> anyhow::Result<()> {
    let sh = Shell::new()?;
    let mut emulators = start(&sh, &lab_dir().join("logs"))?;
    println!("# emulators running; export these, then run tests or workers (Ctrl-C stops both):");
    for (k, v) in emulators.aws_env() {
        println!("export {k}={v}");
    }
    // Ctrl-C reaches the whole foreground process group: the emulators stop with us.
    loop {
        for h in &emulators.handles {
            if let Ok(Some(out)) = h.try_wait() {
                let status = out.status;
                emulators.kill_all();
                bail!(
                    "an emulator exited ({status}); logs are in {}",
                    lab_dir().join("logs").display()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The standard AWS SDK settings that point an AWS client at emulators on these URLs (the one
/// definition: tests, the local lab's workers and `measure` all use it).
pub fn aws_env(kinesis_url: &str, dynamodb_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL_KINESIS", kinesis_url.to_owned()),
        ("AWS_ENDPOINT_URL_DYNAMODB", dynamodb_url.to_owned()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        // No shared config or instance metadata lookups against the real AWS.
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
    ]
}
