//! Small helpers shared by the commands.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The workspace root: the checkout the command runs in (so a prebuilt xtask, such as
/// `nix run .#xtask`, works on the checkout), else the one it was built from.
pub fn project_root() -> PathBuf {
    let is_root = |d: &Path| {
        d.join("xtask").is_dir() && d.join("Cargo.toml").is_file() && d.join("lab").is_dir()
    };
    if let Ok(cwd) = std::env::current_dir()
        && let Some(root) = cwd.ancestors().find(|d| is_root(d))
    {
        return root.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

/// Git-ignored lab state: installed emulators, logs, local lab processes. `XTASK_LAB_DIR`
/// moves it (the end-to-end test runs its own lab beside a developer's).
pub fn lab_dir() -> PathBuf {
    match std::env::var_os("XTASK_LAB_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => project_root().join(".lab"),
    }
}

/// Installed emulators, shared by every lab dir (installing them once is enough).
pub fn tools_dir() -> PathBuf {
    project_root().join(".lab").join("tools")
}

/// A binary cargo built with `profile`, where cargo puts it (`CARGO_TARGET_DIR` honoured).
pub fn built_binary(profile: &str, name: &str) -> PathBuf {
    // A relative CARGO_TARGET_DIR is relative to where cargo runs: the project root.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| project_root().join(d))
        .unwrap_or_else(|| project_root().join("target"));
    target.join(profile).join(name)
}

/// A port nobody listens on right now (the OS picks it).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET path` with a short timeout; the HTTP status, or `None` if nothing answered.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// `GET path` on a worker's HTTP port: status and body (`None` if it does not answer in 2 s).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_owned()))
}

/// Seconds with one decimal, for progress lines.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Today's UTC date, `YYYY-MM-DD`, to say when a measurement was made.
pub fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    date_of_day(secs / 86_400)
}

/// The civil date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn date_of_day(days: u64) -> String {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `nix (Nix) 2.8.0` → (2, 8).
pub fn parse_nix_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split_whitespace().last()?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The installed Nix's version (`nix --version`), or `None` without a working Nix. The one
/// "is Nix here" check: setup, preflight, doctor and the test command all ask it.
pub fn nix_version() -> Option<(u32, u32)> {
    std::process::Command::new("nix")
        .arg("--version")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| parse_nix_version(&String::from_utf8_lossy(&o.stdout)))
}

/// Nix builds the worker image on Linux with flakes (Nix 2.4 or later; xtask enables them per
/// call).
pub fn nix_builds_images(version: Option<(u32, u32)>) -> bool {
    cfg!(target_os = "linux") && version.is_some_and(|v| v >= (2, 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_since_the_epoch_are_civil_dates() {
        assert_eq!(date_of_day(0), "1970-01-01");
        assert_eq!(date_of_day(59), "1970-03-01");
        assert_eq!(date_of_day(11_016), "2000-02-29");
        assert_eq!(date_of_day(20_786), "2026-11-29");
    }

    #[test]
    fn nix_versions_parse() {
        assert_eq!(parse_nix_version("nix (Nix) 2.8.0\n"), Some((2, 8)));
        assert_eq!(parse_nix_version("nix (Nix) 2.24.10"), Some((2, 24)));
        assert_eq!(parse_nix_version("garbage"), None);
    }
}
