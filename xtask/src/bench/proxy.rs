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
    /// Approximate read capacity units: per 4 KiB of answer (at least one), 1 for a strongly
    /// consistent read (`ConsistentRead`), 0.5 for an eventually consistent one.
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
            let per_4k = if call.body.contains("\"ConsistentRead\":true") {
                1.0
            } else {
                0.5
            };
            self.read_units += (call.response_bytes as f64 / 4096.0).ceil().max(1.0) * per_4k;
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

fn serve(client: TcpStream, upstream: SocketAddr, calls: Arc<Mutex<Vec<Call>>>, t0: Instant) {
    let mut client = Conn::new(client);
    let mut server: Option<Conn> = None;
    loop {
        let Some(request) = client.read_message(Kind::Request) else {
            return;
        };
        let at = t0.elapsed().as_secs_f64();
        // A kept-alive upstream connection may have been closed while idle: a request that
        // gets no answer on a reused connection is sent once more on a new one.
        let mut response = None;
        for _ in 0..2 {
            let reused = server.is_some();
            if server.is_none() {
                match TcpStream::connect(upstream) {
                    Ok(s) => server = Some(Conn::new(s)),
                    Err(_) => return,
                }
            }
            let up = server.as_mut().expect("connected above");
            response = up
                .send(&request.bytes)
                .and_then(|()| up.read_message(Kind::Response));
            if response.is_some() || !reused {
                break;
            }
            server = None;
        }
        let Some(response) = response else {
            return;
        };
        let body = String::from_utf8_lossy(&request.body).into_owned();
        let answer = String::from_utf8_lossy(&response.body);
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
        if client.send(&response.bytes).is_none() {
            return;
        }
        if response.closes {
            return;
        }
        if header(&response.head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            // The upstream closes its side; the next request gets a new connection.
            server = None;
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

/// One HTTP/1.1 message as read.
struct Message {
    head: String,
    /// Every byte, as passed on.
    bytes: Vec<u8>,
    /// The body without its chunk framing.
    body: Vec<u8>,
    /// A response delimited by closing the connection (no length, not chunked).
    closes: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Request,
    Response,
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// A connection and the bytes read from it beyond the last message.
struct Conn<S = TcpStream> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: Read + Write> Conn<S> {
    fn new(stream: S) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Option<()> {
        self.stream.write_all(bytes).ok()
    }

    /// Reads more bytes; `None` at end of stream or on an error.
    fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Some(())
    }

    /// The index just past the next `\r\n` at or after `from`, reading as needed.
    fn line_end(&mut self, from: usize) -> Option<usize> {
        loop {
            if let Some(i) = self.buf[from..].windows(2).position(|w| w == b"\r\n") {
                return Some(from + i + 2);
            }
            self.fill()?;
        }
    }

    /// Reads one message: headers, then a `Content-Length` body, a chunked body (trailers
    /// included), or for a response with neither, everything until the upstream closes.
    /// Bytes after the message stay buffered for the next one.
    fn read_message(&mut self, kind: Kind) -> Option<Message> {
        let header_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..header_end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok());
        let bodiless =
            kind == Kind::Response && status.is_some_and(|c| c < 200 || c == 204 || c == 304);
        let mut body = Vec::new();
        let mut closes = false;
        let end = if bodiless {
            header_end
        } else if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut at = header_end;
            loop {
                let size_end = self.line_end(at)?;
                let size_text = String::from_utf8_lossy(&self.buf[at..size_end - 2]).to_string();
                let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
                if size == 0 {
                    // Trailer fields, if any, then an empty line.
                    let mut line = size_end;
                    loop {
                        let next = self.line_end(line)?;
                        if next == line + 2 {
                            break;
                        }
                        line = next;
                    }
                    break line + 2;
                }
                let next = size_end + size + 2;
                while self.buf.len() < next {
                    self.fill()?;
                }
                body.extend_from_slice(&self.buf[size_end..size_end + size]);
                at = next;
            }
        } else if let Some(length) = header(&head, "content-length") {
            let length: usize = length.trim().parse().ok()?;
            while self.buf.len() < header_end + length {
                self.fill()?;
            }
            body.extend_from_slice(&self.buf[header_end..header_end + length]);
            header_end + length
        } else if kind == Kind::Response {
            while self.fill().is_some() {}
            closes = true;
            body.extend_from_slice(&self.buf[header_end..]);
            self.buf.len()
        } else {
            header_end
        };
        let bytes: Vec<u8> = self.buf.drain(..end).collect();
        Some(Message {
            head,
            bytes,
            body,
            closes,
        })
    }
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
                let mut s = Conn::new(s.unwrap());
                while let Some(m) = s.read_message(Kind::Request) {
                    let body = if m.head.contains("UpdateItem") {
                        r#"{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException"}"#
                    } else {
                        r#"{"Item":{}}"#
                    };
                    let _ = write!(
                        s.stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            }
        });
        let proxy = RecordingProxy::start(up_addr).unwrap();
        let mut c = Conn::new(TcpStream::connect(proxy.addr).unwrap());
        for (op, body) in [
            ("GetItem", r#"{"TableName": "t-leases","Key":{}}"#),
            (
                "UpdateItem",
                r#"{"TableName":"t-meta","ConditionExpression":"x = :x"}"#,
            ),
        ] {
            write!(
                c.stream,
                "POST / HTTP/1.1\r\nX-Amz-Target: DynamoDB_20120810.{op}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let answer = c.read_message(Kind::Response).unwrap();
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

    fn conn(bytes: &str) -> Conn<std::io::Cursor<Vec<u8>>> {
        Conn::new(std::io::Cursor::new(bytes.as_bytes().to_vec()))
    }

    #[test]
    fn a_strongly_consistent_read_costs_twice_an_eventually_consistent_one() {
        let read = |body: &str, response_bytes: usize| Call {
            at: 0.0,
            operation: "GetItem".into(),
            table: None,
            body: body.into(),
            request_bytes: body.len(),
            response_bytes,
            conditional: false,
            condition_failed: false,
        };
        let mut t = Tally::default();
        t.add(&read(r#"{"Key":{},"ConsistentRead":true}"#, 100));
        assert_eq!(t.read_units, 1.0);
        t.add(&read(r#"{"Key":{}}"#, 100));
        assert_eq!(t.read_units, 1.5);
        // 9 KiB answered: three 4 KiB units.
        t.add(&read(r#"{"ConsistentRead":true}"#, 9 * 1024));
        assert_eq!(t.read_units, 4.5);
    }

    #[test]
    fn messages_are_framed_by_length_chunks_with_trailers_or_the_close() {
        // Two requests in one read: the second stays buffered.
        let mut c = conn(
            "POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert_eq!(c.read_message(Kind::Request).unwrap().body, b"{}");
        assert_eq!(c.read_message(Kind::Request).unwrap().body, b"abc");
        assert!(c.read_message(Kind::Request).is_none());
        // Chunked, with a chunk extension and a trailer; the body loses the framing.
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-Checksum: 1\r\n\r\n";
        let mut c = conn(&format!("{chunked}HTTP/1.1 204 No Content\r\n\r\n"));
        let m = c.read_message(Kind::Response).unwrap();
        assert_eq!(m.body, b"abcde");
        assert_eq!(m.bytes, chunked.as_bytes());
        // A 204 has no body even without a length.
        let m = c.read_message(Kind::Response).unwrap();
        assert!(m.body.is_empty() && !m.closes);
        // A response with neither length nor chunks ends when the upstream closes.
        let mut c = conn("HTTP/1.0 200 OK\r\n\r\n{\"a\":1}");
        let m = c.read_message(Kind::Response).unwrap();
        assert_eq!(m.body, b"{\"a\":1}");
        assert!(m.closes);
    }

    #[test]
    fn an_upstream_that_closed_a_kept_alive_connection_gets_the_request_again() {
        // One answer per connection, then a silent close (no `Connection: close`).
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in upstream.incoming() {
                let mut s = Conn::new(s.unwrap());
                if s.read_message(Kind::Request).is_some() {
                    let _ = write!(s.stream, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{{}}");
                }
            }
        });
        let proxy = RecordingProxy::start(up_addr).unwrap();
        let mut c = Conn::new(TcpStream::connect(proxy.addr).unwrap());
        for _ in 0..3 {
            write!(
                c.stream,
                "POST / HTTP/1.1\r\nX-Amz-Target: DynamoDB_20120810.GetItem\r\nContent-Length: 2\r\n\r\n{{}}"
            )
            .unwrap();
            let answer = c.read_message(Kind::Response).unwrap();
            assert!(answer.head.starts_with("HTTP/1.1 200"));
        }
        assert_eq!(proxy.calls().len(), 3);
    }
}
