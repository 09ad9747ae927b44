//! A recording HTTP proxy in front of one emulator: every request is passed on unchanged and
//! counted by the second it was made in, its operation (`X-Amz-Target`), its table
//! (`TableName`), a category the system under test gives it (lease, heartbeat, checkpoint,
//! coordination) and whether a conditional write failed. Request and response sizes give
//! approximate DynamoDB capacity units. Every system reaches AWS only through these proxies, so
//! the counts are the same for all of them, whatever their SDK.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Call {
    /// Seconds since the proxy started.
    pub at: f64,
    pub operation: String,
    pub table: Option<String>,
    /// The request body (JSON), for the category.
    pub body: String,
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub conditional: bool,
    pub condition_failed: bool,
}

/// Totals per (category, operation) over some window.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tally {
    pub calls: u64,
    /// Approximate write capacity units: 1 per KiB of request, at least 1 per write.
    pub write_units: f64,
    /// Approximate read capacity units: 1 per 4 KiB of answer, at least 0.5 per read
    /// (eventually consistent) — an upper bound for strongly consistent ones is twice that.
    pub read_units: f64,
    pub conditional: u64,
    pub condition_failed: u64,
}

/// DynamoDB write operations (everything else a system calls is a read or control call).
pub const DYNAMODB_WRITES: &[&str] = &[
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "TransactWriteItems",
    "BatchWriteItem",
];
/// DynamoDB read operations.
pub const DYNAMODB_READS: &[&str] = &[
    "GetItem",
    "Scan",
    "Query",
    "BatchGetItem",
    "TransactGetItems",
];

impl Tally {
    pub fn add(&mut self, call: &Call) {
        self.calls += 1;
        if DYNAMODB_WRITES.contains(&call.operation.as_str()) {
            self.write_units += (call.request_bytes as f64 / 1024.0).ceil().max(1.0);
        }
        if DYNAMODB_READS.contains(&call.operation.as_str()) {
            self.read_units += (call.response_bytes as f64 / 4096.0).ceil().max(1.0) / 2.0;
        }
        self.conditional += u64::from(call.conditional);
        self.condition_failed += u64::from(call.condition_failed);
    }
}

/// The proxy; stops accepting when dropped (open connections end with their client).
pub struct RecordingProxy {
    pub addr: SocketAddr,
    /// When it started: [`Call::at`] counts from here.
    pub started: Instant,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Arc<AtomicBool>,
}

impl RecordingProxy {
    /// Listens on a free loopback port and passes everything on to `upstream`.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<RecordingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let (c, s) = (calls.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let c = c.clone();
                std::thread::spawn(move || serve(client, upstream, c, started));
            }
        });
        Ok(RecordingProxy {
            addr,
            started,
            calls,
            stop,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(mut client: TcpStream, upstream: SocketAddr, calls: Arc<Mutex<Vec<Call>>>, t0: Instant) {
    let mut server: Option<TcpStream> = None;
    loop {
        let Some(request) = read_message(&mut client) else {
            return;
        };
        let at = t0.elapsed().as_secs_f64();
        if server.is_none() {
            match TcpStream::connect(upstream) {
                Ok(s) => server = Some(s),
                Err(_) => return,
            }
        }
        let up = server.as_mut().expect("connected above");
        if up.write_all(&request.bytes).is_err() {
            return;
        }
        let Some(response) = read_message(up) else {
            return;
        };
        let body = String::from_utf8_lossy(&request.bytes[request.head.len()..]).into_owned();
        let answer = String::from_utf8_lossy(&response.bytes[response.head.len()..]);
        let call = Call {
            at,
            operation: header(&request.head, "x-amz-target")
                .and_then(|t| t.rsplit('.').next().map(str::to_owned))
                .unwrap_or_else(|| "?".to_owned()),
            table: json_string(&body, "TableName"),
            conditional: body.contains("\"ConditionExpression\"") || body.contains("\"Expected\""),
            condition_failed: answer.contains("ConditionalCheckFailed")
                || answer.contains("TransactionCanceled"),
            request_bytes: body.len(),
            response_bytes: answer.len(),
            body,
        };
        calls.lock().unwrap_or_else(|e| e.into_inner()).push(call);
        if client.write_all(&response.bytes).is_err() {
            return;
        }
        if header(&response.head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            return;
        }
    }
}

/// The first `"key": "value"` string member in a JSON text.
pub fn json_string(body: &str, key: &str) -> Option<String> {
    let rest = body.split(&format!("\"{key}\"")).nth(1)?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest.split('"').next()?.to_owned())
}

/// One HTTP/1.1 message as read: the head and every byte.
struct Message {
    head: String,
    bytes: Vec<u8>,
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

fn fill(s: &mut impl Read, bytes: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16384];
    let n = s.read(&mut chunk).ok()?;
    if n == 0 {
        return None;
    }
    bytes.extend_from_slice(&chunk[..n]);
    Some(())
}

/// Reads one request or response: headers, then a `Content-Length` or chunked body.
fn read_message(s: &mut impl Read) -> Option<Message> {
    let mut bytes = Vec::new();
    let header_end = loop {
        if let Some(i) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, &mut bytes)?;
    };
    let head = String::from_utf8_lossy(&bytes[..header_end]).into_owned();
    if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut at = header_end;
        loop {
            let line_end = loop {
                if let Some(i) = bytes[at..].windows(2).position(|w| w == b"\r\n") {
                    break at + i;
                }
                fill(s, &mut bytes)?;
            };
            let size_text = String::from_utf8_lossy(&bytes[at..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            let next = line_end + 2 + size + 2;
            while bytes.len() < next {
                fill(s, &mut bytes)?;
            }
            at = next;
            if size == 0 {
                bytes.truncate(at);
                break;
            }
        }
    } else {
        let length: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while bytes.len() < header_end + length {
            fill(s, &mut bytes)?;
        }
        bytes.truncate(header_end + length);
    }
    Some(Message { head, bytes })
}

/// Sums `calls` by (category, operation), with `category` naming each call.
pub fn tally(
    calls: &[Call],
    category: impl Fn(&Call) -> &'static str,
) -> BTreeMap<(String, String), Tally> {
    let mut out: BTreeMap<(String, String), Tally> = BTreeMap::new();
    for c in calls {
        out.entry((category(c).to_owned(), c.operation.clone()))
            .or_default()
            .add(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_passed_on_and_recorded_with_its_table_and_condition() {
        // An upstream that fails every conditional write, like DynamoDB on a lost race.
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in upstream.incoming() {
                let mut s = s.unwrap();
                while let Some(m) = read_message(&mut s) {
                    let body = if m.head.contains("UpdateItem") {
                        r#"{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException"}"#
                    } else {
                        r#"{"Item":{}}"#
                    };
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            }
        });
        let proxy = RecordingProxy::start(up_addr).unwrap();
        let mut c = TcpStream::connect(proxy.addr).unwrap();
        for (op, body) in [
            ("GetItem", r#"{"TableName": "t-leases","Key":{}}"#),
            (
                "UpdateItem",
                r#"{"TableName":"t-meta","ConditionExpression":"x = :x"}"#,
            ),
        ] {
            write!(
                c,
                "POST / HTTP/1.1\r\nX-Amz-Target: DynamoDB_20120810.{op}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let answer = read_message(&mut c).unwrap();
            assert!(answer.head.starts_with("HTTP/1.1 200"));
        }
        let calls = proxy.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].table.as_deref(), Some("t-leases"));
        assert!(!calls[0].conditional);
        assert!(calls[1].conditional && calls[1].condition_failed);
        let t = tally(&calls, |c| {
            if c.operation == "GetItem" {
                "lease"
            } else {
                "coordination"
            }
        });
        assert_eq!(
            t[&("lease".to_owned(), "GetItem".to_owned())].read_units,
            0.5
        );
        assert_eq!(
            t[&("coordination".to_owned(), "UpdateItem".to_owned())].write_units,
            1.0
        );
    }
}
