//! `XTASK_KINESIS_MOCK_DIR` (what `nix develop` sets) is where kinesis-mock starts from: a copy
//! of the package elsewhere, with nothing under `.lab/tools/` pointing at it, serves Kinesis.
//! Needs the pinned emulators installed (`cargo xtask test` installs them before the tests).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// kinesis-mock as `cargo xtask test` installed it.
fn installed_package() -> PathBuf {
    let tools = root().join(".lab").join("tools");
    let dir = std::fs::read_dir(&tools)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask test`", tools.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kinesis-mock-"))
        })
        .expect("kinesis-mock installed under .lab/tools (run `cargo xtask test`)");
    dir.join("node_modules").join("kinesis-local")
}

#[test]
fn kinesis_mock_starts_from_the_directory_xtask_kinesis_mock_dir_names() {
    let installed = installed_package();
    let copy = std::env::temp_dir().join(format!("kds-kinesis-mock-{}", std::process::id()));
    let lab = copy.join("lab");
    std::fs::create_dir_all(&lab).unwrap();
    for file in ["main.js", "server.json", "package.json"] {
        std::fs::copy(installed.join(file), copy.join(file))
            .unwrap_or_else(|e| panic!("copying {file}: {e}"));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("emulators")
        .env("XTASK_KINESIS_MOCK_DIR", &copy)
        .env("XTASK_LAB_DIR", &lab)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own group: the emulators it starts are stopped with it below.
        .process_group(0)
        .spawn()
        .expect("run xtask emulators");
    let pgid = child.id();
    let stop = || {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{pgid}")])
            .status();
    };
    let mut endpoint = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        if let Some(url) = line.strip_prefix("export AWS_ENDPOINT_URL_KINESIS=") {
            endpoint = Some(url.trim_start_matches("http://").to_owned());
            break;
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let answer = endpoint.as_deref().and_then(|addr| {
        let mut s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET /healthcheck HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    });
    // Which main.js the running node process was started with.
    let node_args: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("node "))
        .collect();
    stop();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&copy);
    let answer = answer.expect("kinesis-mock answered no health check");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let from_copy = copy.join("main.js").display().to_string();
    assert!(
        node_args.iter().any(|c| c.contains(&from_copy)),
        "kinesis-mock was not started from {from_copy}: {node_args:?}"
    );
}
