//! Configuration: built-in defaults < TOML file (the ConfigMap) < `KDS_*` environment.
//!
//! Values are read through figment as loosely typed values and validated here, so that every
//! mistake is reported as one line naming the key, the bad value, where it came from and what
//! is allowed (exit code 2, before any AWS call).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::Value;
use figment::{Figment, Provider};
use serde::Serialize;

/// Where the ConfigMap is mounted in the pod.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kds-worker/config.toml";
/// Environment prefix of every key.
pub const ENV_PREFIX: &str = "KDS_";

/// A key's default when no layer sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDefault {
    /// This text, parsed like a configured value.
    Text(&'static str),
    /// Derived from where the worker runs (pod name, namespace, whether in a pod).
    FromSurroundings,
    /// None: the key is required (`stream_name`) or optional (`record_log`).
    Unset,
}

/// Every configuration key with its default, in the order `kds-worker config` prints them.
/// Each default is written here once; `Settings::from_figment` parses it like a configured
/// value, so a default is held to the same rules.
pub const KEYS: &[(&str, KeyDefault)] = &[
    ("app_name", KeyDefault::Text("kds-consumer-app")),
    ("stream_name", KeyDefault::Unset),
    ("max_leases_cap", KeyDefault::Text("80")),
    ("worker_id", KeyDefault::FromSurroundings),
    ("worker_count_source", KeyDefault::Text("kubernetes")),
    ("statefulset_name", KeyDefault::Text("kds-consumer")),
    ("namespace", KeyDefault::FromSurroundings),
    ("shard_poll_interval", KeyDefault::Text("10s")),
    ("heartbeat_interval", KeyDefault::Text("2s")),
    ("failover_timeout", KeyDefault::Text("10s")),
    ("idle_poll_max", KeyDefault::Text("5s")),
    ("http_addr", KeyDefault::Text("0.0.0.0:8080")),
    ("log_format", KeyDefault::FromSurroundings),
    ("record_log", KeyDefault::Unset),
];

/// How the coordinator counts workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerCountSource {
    /// `min(StatefulSet spec.replicas, live heartbeats)`.
    Kubernetes,
    /// Live heartbeats only; no cluster needed.
    Heartbeats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// The validated configuration of one worker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub app_name: String,
    pub stream_name: String,
    pub max_leases_cap: u64,
    pub worker_id: String,
    pub worker_count_source: WorkerCountSource,
    pub statefulset_name: String,
    pub namespace: String,
    #[serde(with = "humantime_serde")]
    pub shard_poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub failover_timeout: Duration,
    /// The longest wait between two reads of a shard that keeps returning nothing.
    #[serde(with = "humantime_serde")]
    pub idle_poll_max: Duration,
    pub http_addr: SocketAddr,
    pub log_format: LogFormat,
    /// Where to append one line per processed record (the lab's audit); none by default.
    pub record_log: Option<std::path::PathBuf>,
}

impl Settings {
    /// The KCL-compatible lease table.
    pub fn lease_table(&self) -> String {
        self.app_name.clone()
    }

    /// The metadata table: coordinator, lease_limits and heartbeats.
    pub fn meta_table(&self) -> String {
        format!("{}_meta", self.app_name)
    }
}

/// The shortest accepted `heartbeat_interval`.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// The shortest accepted `shard_poll_interval` (`DescribeStreamSummary` allows 20 calls per
/// second per account).
pub const MIN_SHARD_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest accepted `idle_poll_max`: the first wait after an empty read.
pub const MIN_IDLE_POLL_MAX: Duration = Duration::from_secs(1);
/// `failover_timeout` must be at least this many heartbeat intervals: the fence rises
/// `failover_timeout - heartbeat_interval` after the last good heartbeat, and that must leave
/// room for two missed heartbeats plus one more attempt, sent an interval apart (each write
/// bounded by [`Settings::heartbeat_write_timeout`]).
pub const MIN_FAILOVER_HEARTBEATS: u32 = 4;
/// The shortest [`Settings::settling_interval`] (unless the heartbeat is shorter still): the
/// coordinator's lease scan is eventually consistent, and a round much sooner than this
/// after its own writes would often plan from items read before them.
pub const SETTLING_INTERVAL_MIN: Duration = Duration::from_millis(250);
/// Heartbeat items outlive their last renewal by at least this much before DynamoDB's TTL may
/// remove them. TTL is a backstop only: nothing decides from it.
pub const MIN_HEARTBEAT_TTL: Duration = Duration::from_secs(3600);

/// Durations derived from the configured ones, next to the rules (`check_timings`) that make
/// them meaningful.
impl Settings {
    /// The fence rises this long after the last successful heartbeat was *sent*: one heartbeat
    /// before anyone may judge this worker dead, so every consumer has stopped by then.
    pub fn fence_after(&self) -> Duration {
        self.failover_timeout
            .saturating_sub(self.heartbeat_interval)
    }

    /// A coordinator's duties stop this long after its last successful claim or renewal was
    /// sent, even while a renewal is still in flight (same margin as the fence).
    pub fn term_after(&self) -> Duration {
        self.fence_after()
    }

    /// While the fleet settles, the coordinator's lease rounds and the reads each worker makes
    /// of its own leases come this often instead of once a heartbeat: a quarter heartbeat,
    /// but not under [`SETTLING_INTERVAL_MIN`] unless the heartbeat itself is shorter.
    pub fn settling_interval(&self) -> Duration {
        (self.heartbeat_interval / 4)
            .max(SETTLING_INTERVAL_MIN)
            .min(self.heartbeat_interval)
    }

    /// How long the fleet counts as settling after a change: for the coordinator, a round
    /// whose live count or listed shards changed or one of whose writes landed; for a worker,
    /// a new limit, a new lease stamp, or (as coordinator) leases it assigned to itself. Long enough for the
    /// other workers, who see a new limit up to a heartbeat later, to hand leases over, and
    /// for the receivers to take them.
    pub fn settling_window(&self) -> Duration {
        self.heartbeat_interval * 2
    }

    /// The longest a follower trusts the coordinator item's stamps without reading what they
    /// stand for: `lease_limits` (see `meta::limit_read_due`) and its own leases (see
    /// `lease_manager::lease_query_due`) are read at least this often however the stamps
    /// look: five failover timeouts. Only an item written by hand (or a change no coordinator
    /// saw) needs it; a coordinator that does not stamp shows its own epoch without a stamp
    /// of it, and then both are read every heartbeat.
    pub fn stamp_refresh_interval(&self) -> Duration {
        self.failover_timeout * 5
    }

    /// The longest one heartbeat write may take; a slower one counts as failed. A write that
    /// succeeds late still proves liveness as of when it was *sent* (the fence counts from
    /// there), so it may take until one heartbeat before the fence: the next write then still
    /// has a whole interval. With `failover_timeout ≥ 4 × heartbeat_interval` that is at
    /// least two intervals.
    pub fn heartbeat_write_timeout(&self) -> Duration {
        self.fence_after().saturating_sub(self.heartbeat_interval)
    }

    /// `/ready` reports a heartbeat or a limit read as stale after this (two missed rounds).
    pub fn stale_after(&self) -> Duration {
        self.heartbeat_interval * 2 + Duration::from_millis(500)
    }

    /// `failover_timeout` in milliseconds, as published in heartbeat and coordinator items.
    pub fn failover_ms(&self) -> u64 {
        u64::try_from(self.failover_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// How long a heartbeat item outlives its last renewal before DynamoDB's TTL may delete
    /// it: far beyond any liveness decision (which uses the monotonic clock only).
    pub fn heartbeat_ttl(&self) -> Duration {
        MIN_HEARTBEAT_TTL.max(self.failover_timeout.saturating_mul(100))
    }

    /// The timing rules [`Settings::load`] enforces, for settings built in code.
    pub fn check_timings(&self) -> Result<(), ConfigError> {
        check_timings(
            (self.heartbeat_interval, None),
            (self.failover_timeout, None),
            (self.shard_poll_interval, None),
        )
    }
}

/// One timing value and where it came from (`None`: built in code or a default).
type Timed<'a> = (Duration, Option<&'a str>);

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The rules that keep the fence meaningful. A violation names every key involved and its
/// value in one line.
fn check_timings(
    heartbeat: Timed<'_>,
    failover: Timed<'_>,
    shard_poll: Timed<'_>,
) -> Result<(), ConfigError> {
    let err = |key: &str, (value, origin): Timed<'_>, allowed: String| ConfigError {
        key: key.into(),
        value: Some(fmt_duration(value)),
        origin: origin.map(str::to_owned),
        allowed,
    };
    if heartbeat.0 < MIN_HEARTBEAT_INTERVAL {
        return Err(err(
            "heartbeat_interval",
            heartbeat,
            format!("expected at least {}", fmt_duration(MIN_HEARTBEAT_INTERVAL)),
        ));
    }
    if shard_poll.0 < MIN_SHARD_POLL_INTERVAL {
        return Err(err(
            "shard_poll_interval",
            shard_poll,
            format!(
                "expected at least {}",
                fmt_duration(MIN_SHARD_POLL_INTERVAL)
            ),
        ));
    }
    let min_failover = heartbeat.0.saturating_mul(MIN_FAILOVER_HEARTBEATS);
    if failover.0 < min_failover {
        return Err(err(
            "failover_timeout",
            failover,
            format!(
                "expected at least {MIN_FAILOVER_HEARTBEATS} x heartbeat_interval = {} \
                 (heartbeat_interval = {:?}{}), so that the fence (failover_timeout - \
                 heartbeat_interval) leaves room for two missed heartbeats and one more attempt",
                fmt_duration(min_failover),
                fmt_duration(heartbeat.0),
                heartbeat
                    .1
                    .map(|o| format!(" from {o}"))
                    .unwrap_or_default(),
            ),
        ));
    }
    Ok(())
}

/// A configuration mistake: exactly one line for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    /// The offending value as written, if there was one.
    pub value: Option<String>,
    /// Where the value came from (`KDS_MAX_LEASES_CAP`, `/etc/kds-worker/config.toml`, …).
    pub origin: Option<String>,
    /// What is allowed instead.
    pub allowed: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.key)?;
        match &self.value {
            Some(v) => write!(f, " = {v:?}")?,
            None => write!(f, " is missing")?,
        }
        if let Some(origin) = &self.origin {
            write!(f, " (from {origin})")?;
        }
        write!(f, ": {}", self.allowed)
    }
}

impl std::error::Error for ConfigError {}

/// Facts about the process' surroundings that defaults depend on. Injected so that tests do
/// not depend on the machine they run on.
#[derive(Debug, Clone, Default)]
pub struct Surroundings {
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub serviceaccount_namespace: Option<String>,
    pub hostname: Option<String>,
    pub in_kubernetes: bool,
}

impl Surroundings {
    /// Reads the downward-API variables, the service-account namespace and the hostname.
    pub fn detect() -> Self {
        let non_empty = |s: String| {
            let s = s.trim().to_owned();
            (!s.is_empty()).then_some(s)
        };
        Surroundings {
            pod_name: std::env::var("POD_NAME").ok().and_then(non_empty),
            pod_namespace: std::env::var("POD_NAMESPACE").ok().and_then(non_empty),
            serviceaccount_namespace: std::fs::read_to_string(
                "/var/run/secrets/kubernetes.io/serviceaccount/namespace",
            )
            .ok()
            .and_then(non_empty),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .and_then(non_empty),
            in_kubernetes: std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
        }
    }
}

/// Where the TOML file is and whether the user named it (a named file must exist).
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub explicit: bool,
}

impl ConfigFile {
    pub fn from_arg(arg: Option<PathBuf>) -> Self {
        match arg {
            Some(path) => ConfigFile {
                path,
                explicit: true,
            },
            None => ConfigFile {
                path: PathBuf::from(DEFAULT_CONFIG_PATH),
                explicit: false,
            },
        }
    }
}

/// The layered sources (file < env); defaults are applied in [`Settings::from_figment`].
pub fn figment(file: &ConfigFile) -> Result<Figment, ConfigError> {
    if file.explicit && !file.path.is_file() {
        return Err(ConfigError {
            key: "--config".into(),
            value: Some(file.path.display().to_string()),
            origin: Some("command line".into()),
            allowed: "expected a readable TOML file".into(),
        });
    }
    Ok(Figment::new()
        .merge(Toml::file(&file.path))
        .merge(Env::prefixed(ENV_PREFIX)))
}

/// One effective value and where it came from, for `kds-worker config`.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub key: &'static str,
    pub value: String,
    pub source: String,
}

impl Settings {
    /// Loads, layers and validates the configuration.
    pub fn load(
        file: &ConfigFile,
        env: &Surroundings,
    ) -> Result<(Settings, Vec<Provenance>), ConfigError> {
        Settings::from_figment(&figment(file)?, env)
    }

    /// Validates every key of `figment`, filling in defaults.
    pub fn from_figment(
        figment: &Figment,
        env: &Surroundings,
    ) -> Result<(Settings, Vec<Provenance>), ConfigError> {
        let reader = Reader { figment };
        reader.reject_unknown_keys()?;
        let mut provenance = Vec::new();
        // The configured value of `key`, else its default (from KEYS, or `surroundings` for a
        // default that depends on where the worker runs), recorded for `kds-worker config`.
        let mut take = |key: &'static str,
                        surroundings: Option<(String, &str)>|
         -> Result<Option<Raw>, ConfigError> {
            let default = KEYS
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, d)| *d)
                .expect("every key read is listed in KEYS");
            let raw = match reader.raw(key)? {
                Some(raw) => raw,
                None => match (default, surroundings) {
                    (KeyDefault::Text(text), _) => Raw {
                        key,
                        text: text.to_owned(),
                        origin: "default".to_owned(),
                        from_surroundings: false,
                    },
                    (KeyDefault::FromSurroundings, Some((text, origin))) => Raw {
                        key,
                        text,
                        origin: origin.to_owned(),
                        from_surroundings: true,
                    },
                    _ => return Ok(None),
                },
            };
            provenance.push(Provenance {
                key,
                value: raw.text.clone(),
                source: raw.origin.clone(),
            });
            Ok(Some(raw))
        };

        let app_name = has(take("app_name", None)?).table_name()?;
        let stream_name = match take("stream_name", None)? {
            Some(raw) => raw.stream_name()?,
            None => {
                return Err(ConfigError {
                    key: "stream_name".into(),
                    value: None,
                    origin: None,
                    allowed: "set stream_name in the config file or KDS_STREAM_NAME".into(),
                });
            }
        };
        let max_leases_cap = has(take("max_leases_cap", None)?).integer_at_least(1)?;
        let default_worker_id = env
            .pod_name
            .clone()
            .map(|n| (n, "default (POD_NAME)"))
            .or_else(|| env.hostname.clone().map(|h| (h, "default (hostname)")))
            .unwrap_or_else(|| {
                (
                    format!("kds-worker-{}", std::process::id()),
                    "default (pid)",
                )
            });
        let raw = has(take("worker_id", Some(default_worker_id))?);
        let worker_id = if raw.from_surroundings {
            raw.text
        } else {
            raw.identifier()?
        };
        let raw = has(take("worker_count_source", None)?);
        let worker_count_source = match raw.text.to_ascii_lowercase().as_str() {
            "kubernetes" => WorkerCountSource::Kubernetes,
            "heartbeats" => WorkerCountSource::Heartbeats,
            _ => return Err(raw.invalid("expected kubernetes or heartbeats")),
        };
        let statefulset_name = has(take("statefulset_name", None)?).dns_label()?;
        let default_namespace = env
            .pod_namespace
            .clone()
            .map(|n| (n, "default (POD_NAMESPACE)"))
            .or_else(|| {
                env.serviceaccount_namespace
                    .clone()
                    .map(|n| (n, "default (service account)"))
            })
            .unwrap_or_else(|| ("default".into(), "default"));
        let raw = has(take("namespace", Some(default_namespace))?);
        let namespace = if raw.from_surroundings {
            raw.text
        } else {
            raw.dns_label()?
        };
        let poll_raw = has(take("shard_poll_interval", None)?);
        let shard_poll_interval = poll_raw.duration()?;
        let heartbeat_raw = has(take("heartbeat_interval", None)?);
        let heartbeat_interval = heartbeat_raw.duration()?;
        let failover_raw = has(take("failover_timeout", None)?);
        let failover_timeout = failover_raw.duration()?;
        check_timings(
            (heartbeat_interval, Some(&heartbeat_raw.origin)),
            (failover_timeout, Some(&failover_raw.origin)),
            (shard_poll_interval, Some(&poll_raw.origin)),
        )?;
        let idle_raw = has(take("idle_poll_max", None)?);
        let idle_poll_max = idle_raw.duration()?;
        if idle_poll_max < MIN_IDLE_POLL_MAX {
            return Err(idle_raw.invalid(format!(
                "expected at least {}",
                fmt_duration(MIN_IDLE_POLL_MAX)
            )));
        }
        let raw = has(take("http_addr", None)?);
        let http_addr = raw
            .text
            .parse::<SocketAddr>()
            .map_err(|_| raw.invalid("expected an address like 0.0.0.0:8080 or 127.0.0.1:0"))?;
        let default_format = if env.in_kubernetes {
            ("json".to_owned(), "default (in a pod)")
        } else {
            ("pretty".to_owned(), "default (not in a pod)")
        };
        let raw = has(take("log_format", Some(default_format))?);
        let log_format = match raw.text.to_ascii_lowercase().as_str() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            _ => return Err(raw.invalid("expected json or pretty")),
        };
        let record_log = match take("record_log", None)? {
            Some(raw) if raw.text.trim().is_empty() => {
                return Err(raw.invalid("expected a file path"));
            }
            Some(raw) => Some(std::path::PathBuf::from(raw.text)),
            None => None,
        };
        let settings = Settings {
            app_name,
            stream_name,
            max_leases_cap,
            worker_id,
            worker_count_source,
            statefulset_name,
            namespace,
            shard_poll_interval,
            heartbeat_interval,
            failover_timeout,
            idle_poll_max,
            http_addr,
            log_format,
            record_log,
        };
        Ok((settings, provenance))
    }
}

/// The value of a key that has a default (there always is one).
fn has(raw: Option<Raw>) -> Raw {
    raw.expect("a key with a default has a value")
}

/// A value as the user wrote it (or its default), with its key and origin.
#[derive(Debug, Clone)]
struct Raw {
    key: &'static str,
    text: String,
    origin: String,
    /// A default taken from where the worker runs (a pod name, a namespace): used as found,
    /// not held to the rules for configured values.
    from_surroundings: bool,
}

impl Raw {
    fn invalid(&self, allowed: impl Into<String>) -> ConfigError {
        ConfigError {
            key: self.key.into(),
            value: Some(self.text.clone()),
            origin: Some(self.origin.clone()),
            allowed: allowed.into(),
        }
    }

    fn integer_at_least(&self, min: u64) -> Result<u64, ConfigError> {
        match self.text.trim().parse::<u64>() {
            Ok(n) if n >= min => Ok(n),
            _ => Err(self.invalid(format!("expected an integer >= {min}"))),
        }
    }

    fn duration(&self) -> Result<Duration, ConfigError> {
        match humantime::parse_duration(self.text.trim()) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(self.invalid("expected a positive duration such as 10s, 500ms or 1m")),
        }
    }

    /// DynamoDB table names: 3..=255 of `[A-Za-z0-9_.-]`; `_meta` is appended, so ≤ 250.
    fn table_name(&self) -> Result<String, ConfigError> {
        let t = self.text.trim();
        let ok = (3..=250).contains(&t.len())
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if ok {
            Ok(t.to_owned())
        } else {
            Err(self.invalid("expected 3 to 250 characters of A-Z a-z 0-9 _ . -"))
        }
    }

    /// Kinesis stream names: 1..=128 of `[A-Za-z0-9_.-]`.
    fn stream_name(&self) -> Result<String, ConfigError> {
        let t = self.text.trim();
        let ok = (1..=128).contains(&t.len())
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if ok {
            Ok(t.to_owned())
        } else {
            Err(self.invalid("expected 1 to 128 characters of A-Z a-z 0-9 _ . -"))
        }
    }

    /// Worker ids end up inside DynamoDB keys and log lines: printable, no `#`, ≤ 128.
    fn identifier(&self) -> Result<String, ConfigError> {
        let t = self.text.trim();
        let ok =
            (1..=128).contains(&t.len()) && t.chars().all(|c| c.is_ascii_graphic() && c != '#');
        if ok {
            Ok(t.to_owned())
        } else {
            Err(self.invalid("expected 1 to 128 printable ASCII characters without spaces or '#'"))
        }
    }

    /// Kubernetes object names (RFC 1123 label).
    fn dns_label(&self) -> Result<String, ConfigError> {
        let t = self.text.trim();
        let ok = (1..=63).contains(&t.len())
            && t.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !t.starts_with('-')
            && !t.ends_with('-');
        if ok {
            Ok(t.to_owned())
        } else {
            Err(self.invalid(
                "expected a Kubernetes name: 1 to 63 of a-z 0-9 -, not starting or ending with -",
            ))
        }
    }
}

struct Reader<'a> {
    figment: &'a Figment,
}

impl Reader<'_> {
    fn origin_of(&self, key: &str, value: &Value) -> String {
        match self.figment.get_metadata(value.tag()) {
            Some(meta) if meta.name.contains("environment") => {
                format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
            }
            Some(meta) => match &meta.source {
                Some(source) => source.to_string(),
                None => meta.name.to_string(),
            },
            None => "unknown source".into(),
        }
    }

    /// The user-written text of `key`, or `None` when no layer sets it.
    fn raw(&self, key: &'static str) -> Result<Option<Raw>, ConfigError> {
        let value = match self.figment.find_value(key) {
            Ok(value) => value,
            Err(e) if e.missing() => return Ok(None),
            Err(e) => {
                return Err(ConfigError {
                    key: key.into(),
                    value: None,
                    origin: None,
                    allowed: format!("could not be read: {e}"),
                });
            }
        };
        let origin = self.origin_of(key, &value);
        let text = match &value {
            Value::String(_, s) => s.clone(),
            Value::Char(_, c) => c.to_string(),
            Value::Bool(_, b) => b.to_string(),
            Value::Num(_, n) => match n.to_u128() {
                Some(u) => u.to_string(),
                None => match n.to_i128() {
                    Some(i) => i.to_string(),
                    None => n.to_f64().map(|f| f.to_string()).unwrap_or_default(),
                },
            },
            other => {
                return Err(ConfigError {
                    key: key.into(),
                    value: Some(format!("{other:?}")),
                    origin: Some(origin),
                    allowed: "expected a plain value (string or number), not a table or list"
                        .into(),
                });
            }
        };
        Ok(Some(Raw {
            key,
            text,
            origin,
            from_surroundings: false,
        }))
    }

    /// A typo in the ConfigMap must not be silently ignored.
    fn reject_unknown_keys(&self) -> Result<(), ConfigError> {
        let Ok(dict) = self.figment.data() else {
            return Ok(());
        };
        for profile in dict.values() {
            for (key, value) in profile {
                if !KEYS.iter().any(|(k, _)| k == key) {
                    return Err(ConfigError {
                        key: key.clone(),
                        value: None,
                        origin: Some(self.origin_of(key, value)),
                        allowed: format!(
                            "unknown key; known keys are {}",
                            KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Path shown in `kds-worker config` output for the file layer.
pub fn describe_file(file: &ConfigFile) -> String {
    let p: &Path = &file.path;
    if p.is_file() {
        p.display().to_string()
    } else {
        format!("{} (not present)", p.display())
    }
}

/// When to checkpoint and how to pace reads.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerTuning {
    pub checkpoint_every_records: u64,
    pub checkpoint_every: Duration,
    /// Wait after an empty read (Kinesis allows 5 GetRecords/s per shard); each further
    /// empty read waits one more of these, up to `idle_poll_max`.
    pub idle_wait: Duration,
    /// The longest wait between reads of an idle shard (the `idle_poll_max` setting).
    pub idle_poll_max: Duration,
    pub max_records_per_call: i32,
}

impl Default for ConsumerTuning {
    fn default() -> Self {
        ConsumerTuning {
            checkpoint_every_records: 1000,
            checkpoint_every: Duration::from_secs(5),
            idle_wait: Duration::from_secs(1),
            idle_poll_max: Duration::from_secs(5),
            max_records_per_call: 1000,
        }
    }
}

impl Settings {
    /// How consumers checkpoint and pace their reads: the defaults, with this
    /// configuration's `idle_poll_max`.
    pub fn consumer_tuning(&self) -> ConsumerTuning {
        ConsumerTuning {
            idle_poll_max: self.idle_poll_max,
            ..ConsumerTuning::default()
        }
    }
}

#[cfg(test)]
// figment::Jail's closures must return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn surroundings() -> Surroundings {
        Surroundings {
            pod_name: Some("kds-consumer-1".into()),
            pod_namespace: Some("lab".into()),
            serviceaccount_namespace: None,
            hostname: Some("laptop".into()),
            in_kubernetes: true,
        }
    }

    fn load_in_jail(jail: &Jail) -> Result<(Settings, Vec<Provenance>), ConfigError> {
        let file = ConfigFile {
            path: jail.directory().join("config.toml"),
            explicit: false,
        };
        Settings::load(&file, &surroundings())
    }

    /// Defaults from where the worker runs are used as found; a configured value is checked.
    #[test]
    fn defaults_from_the_surroundings_are_taken_as_found() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("KDS_STREAM_NAME", "orders");
            let host = Surroundings {
                pod_name: None,
                pod_namespace: None,
                hostname: Some("build#7".into()),
                ..surroundings()
            };
            let file = ConfigFile {
                path: jail.directory().join("config.toml"),
                explicit: false,
            };
            let (s, _) = Settings::load(&file, &host).unwrap();
            assert_eq!(s.worker_id, "build#7");
            jail.set_env("KDS_WORKER_ID", "build#7");
            let err = Settings::load(&file, &host).unwrap_err();
            assert_eq!(err.key, "worker_id");
            Ok(())
        });
    }

    #[test]
    fn defaults_apply_with_only_the_stream_name() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("KDS_STREAM_NAME", "orders");
            let (s, provenance) = load_in_jail(jail).unwrap();
            assert_eq!(s.app_name, "kds-consumer-app");
            assert_eq!(s.meta_table(), "kds-consumer-app_meta");
            assert_eq!(s.max_leases_cap, 80);
            assert_eq!(s.worker_id, "kds-consumer-1");
            assert_eq!(s.namespace, "lab");
            assert_eq!(s.worker_count_source, WorkerCountSource::Kubernetes);
            assert_eq!(s.shard_poll_interval, Duration::from_secs(10));
            assert_eq!(s.heartbeat_interval, Duration::from_secs(2));
            assert_eq!(s.failover_timeout, Duration::from_secs(10));
            assert_eq!(s.http_addr, "0.0.0.0:8080".parse().unwrap());
            assert_eq!(s.log_format, LogFormat::Json);
            let stream = provenance.iter().find(|p| p.key == "stream_name").unwrap();
            assert_eq!(stream.source, "KDS_STREAM_NAME");
            let id = provenance.iter().find(|p| p.key == "worker_id").unwrap();
            assert_eq!(id.source, "default (POD_NAME)");
            Ok(())
        });
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "config.toml",
                r#"
                stream_name = "from-file"
                max_leases_cap = 40
                heartbeat_interval = "500ms"
                failover_timeout = "3s"
                worker_count_source = "heartbeats"
                "#,
            )?;
            jail.set_env("KDS_MAX_LEASES_CAP", "12");
            let (s, provenance) = load_in_jail(jail).unwrap();
            assert_eq!(s.stream_name, "from-file");
            assert_eq!(s.max_leases_cap, 12);
            assert_eq!(s.heartbeat_interval, Duration::from_millis(500));
            assert_eq!(s.failover_timeout, Duration::from_secs(3));
            assert_eq!(s.worker_count_source, WorkerCountSource::Heartbeats);
            let cap = provenance
                .iter()
                .find(|p| p.key == "max_leases_cap")
                .unwrap();
            assert_eq!(cap.source, "KDS_MAX_LEASES_CAP");
            let stream = provenance.iter().find(|p| p.key == "stream_name").unwrap();
            assert!(stream.source.ends_with("config.toml"), "{}", stream.source);
            Ok(())
        });
    }

    #[test]
    fn hostname_is_the_worker_id_outside_a_pod() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("KDS_STREAM_NAME", "s");
            let file = ConfigFile {
                path: jail.directory().join("config.toml"),
                explicit: false,
            };
            let env = Surroundings {
                hostname: Some("laptop".into()),
                ..Default::default()
            };
            let (s, _) = Settings::load(&file, &env).unwrap();
            assert_eq!(s.worker_id, "laptop");
            assert_eq!(s.namespace, "default");
            assert_eq!(s.log_format, LogFormat::Pretty);
            Ok(())
        });
    }

    /// Each bad value is named by key, value and origin.
    #[test]
    fn bad_values_are_reported_by_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("KDS_MAX_LEASES_CAP", "0", "max_leases_cap"),
            ("KDS_MAX_LEASES_CAP", "-3", "max_leases_cap"),
            ("KDS_MAX_LEASES_CAP", "abc", "max_leases_cap"),
            ("KDS_MAX_LEASES_CAP", "1.5", "max_leases_cap"),
            ("KDS_STREAM_NAME", "", "stream_name"),
            ("KDS_STREAM_NAME", "has space", "stream_name"),
            ("KDS_WORKER_COUNT_SOURCE", "consul", "worker_count_source"),
            ("KDS_HEARTBEAT_INTERVAL", "0s", "heartbeat_interval"),
            ("KDS_SHARD_POLL_INTERVAL", "soon", "shard_poll_interval"),
            ("KDS_FAILOVER_TIMEOUT", "1s", "failover_timeout"),
            ("KDS_IDLE_POLL_MAX", "500ms", "idle_poll_max"),
            ("KDS_IDLE_POLL_MAX", "often", "idle_poll_max"),
            ("KDS_HTTP_ADDR", "8080", "http_addr"),
            ("KDS_LOG_FORMAT", "xml", "log_format"),
            ("KDS_APP_NAME", "a", "app_name"),
            ("KDS_WORKER_ID", "a#b", "worker_id"),
            ("KDS_NAMESPACE", "Bad_NS", "namespace"),
            ("KDS_MAX_LEASE_CAP", "10", "max_lease_cap"),
        ];
        for &(var, value, key) in cases {
            Jail::expect_with(|jail| {
                jail.clear_env();
                if var != "KDS_STREAM_NAME" {
                    jail.set_env("KDS_STREAM_NAME", "orders");
                }
                jail.set_env(var, value);
                let err = load_in_jail(jail).expect_err(var);
                assert_eq!(err.key, key, "{var}={value}: {err}");
                let line = err.to_string();
                assert!(!line.contains('\n'), "{line}");
                assert!(line.contains(key), "{line}");
                Ok(())
            });
        }
    }

    #[test]
    fn missing_stream_name_is_an_error() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let err = load_in_jail(jail).unwrap_err();
            assert_eq!(err.key, "stream_name");
            assert!(err.to_string().contains("KDS_STREAM_NAME"));
            Ok(())
        });
    }

    #[test]
    fn unknown_file_key_names_the_file() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("config.toml", "stream_name = \"s\"\nmax_lease_cap = 3\n")?;
            let err = load_in_jail(jail).unwrap_err();
            assert_eq!(err.key, "max_lease_cap");
            assert!(err.origin.unwrap().ends_with("config.toml"));
            Ok(())
        });
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let file = ConfigFile::from_arg(Some("/nonexistent/kds.toml".into()));
        let err = Settings::load(&file, &surroundings()).unwrap_err();
        assert_eq!(err.key, "--config");
    }

    #[test]
    fn failover_must_be_at_least_four_heartbeats() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("KDS_STREAM_NAME", "s");
            jail.set_env("KDS_HEARTBEAT_INTERVAL", "2s");
            jail.set_env("KDS_FAILOVER_TIMEOUT", "8s");
            let (s, _) = load_in_jail(jail).unwrap();
            assert_eq!(s.fence_after(), Duration::from_secs(6));
            jail.set_env("KDS_FAILOVER_TIMEOUT", "7999ms");
            let err = load_in_jail(jail).unwrap_err();
            assert_eq!(err.key, "failover_timeout");
            let line = err.to_string();
            assert!(!line.contains('\n'), "{line}");
            // Both keys, both values, both origins.
            for part in [
                "failover_timeout = \"7s 999ms\"",
                "KDS_FAILOVER_TIMEOUT",
                "heartbeat_interval = \"2s\"",
                "KDS_HEARTBEAT_INTERVAL",
                "4 x heartbeat_interval = 8s",
            ] {
                assert!(line.contains(part), "{part:?} missing from: {line}");
            }
            // Twice the heartbeat, accepted before, would raise the fence on every heartbeat.
            jail.set_env("KDS_FAILOVER_TIMEOUT", "4s");
            assert_eq!(load_in_jail(jail).unwrap_err().key, "failover_timeout");
            // The default failover (10s) against a long heartbeat names the default.
            jail.clear_env();
            jail.set_env("KDS_STREAM_NAME", "s");
            jail.set_env("KDS_HEARTBEAT_INTERVAL", "3s");
            let line = load_in_jail(jail).unwrap_err().to_string();
            assert!(
                line.contains("failover_timeout = \"10s\" (from default)"),
                "{line}"
            );
            assert!(
                line.contains("heartbeat_interval = \"3s\" from KDS_HEARTBEAT_INTERVAL"),
                "{line}"
            );
            Ok(())
        });
    }

    #[test]
    fn heartbeat_and_shard_poll_have_floors() {
        let cases: &[(&str, &str, &str, bool)] = &[
            (
                "KDS_HEARTBEAT_INTERVAL",
                "99ms",
                "heartbeat_interval",
                false,
            ),
            (
                "KDS_HEARTBEAT_INTERVAL",
                "100ms",
                "heartbeat_interval",
                true,
            ),
            (
                "KDS_SHARD_POLL_INTERVAL",
                "999ms",
                "shard_poll_interval",
                false,
            ),
            ("KDS_SHARD_POLL_INTERVAL", "1s", "shard_poll_interval", true),
        ];
        for &(var, value, key, ok) in cases {
            Jail::expect_with(|jail| {
                jail.clear_env();
                jail.set_env("KDS_STREAM_NAME", "s");
                jail.set_env(var, value);
                match load_in_jail(jail) {
                    Ok(_) => assert!(ok, "{var}={value} accepted"),
                    Err(e) => {
                        assert!(!ok, "{var}={value} refused: {e}");
                        assert_eq!(e.key, key);
                        assert!(e.to_string().contains("expected at least"), "{e}");
                    }
                }
                Ok(())
            });
        }
    }

    #[test]
    fn derived_durations() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("KDS_STREAM_NAME", "s");
            let (s, _) = load_in_jail(jail).unwrap();
            assert_eq!(s.fence_after(), Duration::from_secs(8));
            assert_eq!(s.term_after(), Duration::from_secs(8));
            assert_eq!(s.heartbeat_write_timeout(), Duration::from_secs(6));
            assert_eq!(s.failover_ms(), 10_000);
            assert_eq!(s.heartbeat_ttl(), Duration::from_secs(3600));
            assert!(s.check_timings().is_ok());
            let mut bad = s.clone();
            bad.failover_timeout = bad.heartbeat_interval * 2;
            assert_eq!(bad.check_timings().unwrap_err().key, "failover_timeout");
            Ok(())
        });
    }
}
