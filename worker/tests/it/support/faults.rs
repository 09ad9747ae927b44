//! A fault-injecting HTTP proxy in front of one emulator: every request is read whole, its
//! operation taken from `X-Amz-Target` (`Kinesis_20131202.GetRecords`,
//! `DynamoDB_20120810.UpdateItem`), and the fault set for that operation applied: pass it on,
//! delay it, cut the connection, or answer it with an AWS error body (what the real service
//! sends when it throttles or fails). Requests are counted per operation, so a test can bound
//! a worker's call rate while a fault lasts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does with a request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Passed to the emulator.
    Pass,
    /// The connection is closed without an answer.
    Cut,
    /// Passed to the emulator after this long.
    Delay(Duration),
    /// Answered by the proxy: HTTP `status`, `{"__type": code, "message": message}` plus
    /// `extra` JSON members.
    Error {
        status: u16,
        code: String,
        message: String,
        extra: String,
    },
}

impl Fault {
    /// Kinesis' answer to too many GetRecords calls on one shard.
    pub fn kinesis_throughput_exceeded() -> Fault {
        Fault::error(
            400,
            "ProvisionedThroughputExceededException",
            "Rate exceeded for shard in stream (injected)",
        )
    }

    /// Kinesis' answer to too many control-plane calls (DescribeStreamSummary, ListShards).
    pub fn kinesis_limit_exceeded() -> Fault {
        Fault::error(
            400,
            "LimitExceededException",
            "Rate exceeded for stream (injected)",
        )
    }

    /// DynamoDB's request-rate throttling.
    pub fn dynamodb_throttling() -> Fault {
        Fault::error(
            400,
            "com.amazon.coral.availability#ThrottlingException",
            "Rate of requests exceeds the allowed throughput (injected)",
        )
    }

    /// DynamoDB's table or index throughput exceeded.
    pub fn dynamodb_throughput_exceeded() -> Fault {
        Fault::error(
            400,
            "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
            "The level of configured provisioned throughput for the table was exceeded (injected)",
        )
    }

    /// DynamoDB failing inside.
    pub fn dynamodb_internal_error() -> Fault {
        Fault::error(
            500,
            "com.amazonaws.dynamodb.v20120810#InternalServerError",
            "Internal server error (injected)",
        )
    }

    /// A transaction cancelled by a conflict with another one (not by its conditions).
    pub fn transaction_conflict() -> Fault {
        Fault::Error {
            status: 400,
            code: "com.amazonaws.dynamodb.v20120810#TransactionCanceledException".into(),
            message: "Transaction cancelled, please refer cancellation reasons for specific \
                      reasons [None, TransactionConflict]"
                .into(),
            extra: r#","CancellationReasons":[{"Code":"None"},{"Code":"TransactionConflict","Message":"Transaction is ongoing for the item"}]"#.into(),
        }
    }

    fn error(status: u16, code: &str, message: &str) -> Fault {
        Fault::Error {
            status,
            code: code.into(),
            message: message.into(),
            extra: String::new(),
        }
    }
}

#[derive(Default)]
struct Shared {
    /// Operation name → fault; `*` applies to every operation without its own entry.
    faults: BTreeMap<String, Fault>,
    /// Requests seen per operation (passed or not).
    seen: BTreeMap<String, u64>,
    /// Requests seen per operation and table (a request without a `TableName` is not here).
    seen_by_table: BTreeMap<(String, String), u64>,
    /// Requests answered or cut by a fault, per operation.
    faulted: BTreeMap<String, u64>,
    /// Items returned by DynamoDB reads, per operation (`Count` of a Scan or Query page, one
    /// per GetItem that found its item).
    items: BTreeMap<String, u64>,
}

/// The proxy; see the module comment. Stops when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream_url: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("emulator endpoint is http://IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(client, upstream, state.clone()));
            }
        });
        FaultProxy { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `fault` to `operations` (`["*"]`: all) from now on.
    pub fn set(&self, operations: &[&str], fault: Fault) {
        let mut g = self.shared.lock().unwrap();
        for op in operations {
            g.faults.insert((*op).to_owned(), fault.clone());
        }
    }

    /// Every request passes again.
    pub fn clear(&self) {
        self.shared.lock().unwrap().faults.clear();
    }

    /// Requests seen for `operation` so far.
    pub fn seen(&self, operation: &str) -> u64 {
        *self
            .shared
            .lock()
            .unwrap()
            .seen
            .get(operation)
            .unwrap_or(&0)
    }

    /// Requests seen for `operation` on `table` so far.
    pub fn seen_on(&self, operation: &str, table: &str) -> u64 {
        *self
            .shared
            .lock()
            .unwrap()
            .seen_by_table
            .get(&(operation.to_owned(), table.to_owned()))
            .unwrap_or(&0)
    }

    /// Items DynamoDB returned to `operation` calls so far.
    pub fn items(&self, operation: &str) -> u64 {
        *self
            .shared
            .lock()
            .unwrap()
            .items
            .get(operation)
            .unwrap_or(&0)
    }

    /// Requests for `operation` a fault answered or cut so far.
    pub fn faulted(&self, operation: &str) -> u64 {
        *self
            .shared
            .lock()
            .unwrap()
            .faulted
            .get(operation)
            .unwrap_or(&0)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client connection: request by request (the SDK does not pipeline), each passed on over
/// one upstream connection or answered by its fault.
async fn serve(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Mutex<Shared>>) {
    let mut server: Option<TcpStream> = None;
    loop {
        let Some(request) = read_message(&mut client).await else {
            return;
        };
        let operation = header(&request.head, "x-amz-target")
            .and_then(|t| t.rsplit('.').next().map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned());
        let fault = {
            let mut g = shared.lock().unwrap();
            *g.seen.entry(operation.clone()).or_default() += 1;
            if let Some(table) = table_name(&request) {
                *g.seen_by_table
                    .entry((operation.clone(), table))
                    .or_default() += 1;
            }
            let fault = g
                .faults
                .get(&operation)
                .or_else(|| g.faults.get("*"))
                .cloned()
                .unwrap_or(Fault::Pass);
            if matches!(fault, Fault::Cut | Fault::Error { .. }) {
                *g.faulted.entry(operation.clone()).or_default() += 1;
            }
            fault
        };
        match fault {
            Fault::Cut => return,
            Fault::Error {
                status,
                code,
                message,
                extra,
            } => {
                let body = format!(r#"{{"__type":"{code}","message":"{message}"{extra}}}"#);
                let reason = if status >= 500 {
                    "Internal Server Error"
                } else {
                    "Bad Request"
                };
                let response = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/x-amz-json-1.0\r\n\
                     x-amzn-RequestId: injected\r\nx-amzn-ErrorType: {code}\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if client.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Pass => {}
        }
        if server.is_none() {
            match TcpStream::connect(upstream).await {
                Ok(s) => server = Some(s),
                Err(_) => return,
            }
        }
        let up = server.as_mut().expect("connected above");
        if up.write_all(&request.bytes).await.is_err() {
            return;
        }
        let Some(response) = read_message(up).await else {
            return;
        };
        let items = items_in(&operation, &response);
        if items > 0 {
            *shared
                .lock()
                .unwrap()
                .items
                .entry(operation.clone())
                .or_default() += items;
        }
        if client.write_all(&response.bytes).await.is_err() {
            return;
        }
        if header(&response.head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            return;
        }
    }
}

/// The `TableName` a DynamoDB request names, from its JSON body.
fn table_name(request: &Message) -> Option<String> {
    let body = String::from_utf8_lossy(&request.bytes[request.head.len()..]);
    let rest = body.split("\"TableName\":").nth(1)?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

/// Items a DynamoDB read returned, from its JSON answer.
fn items_in(operation: &str, response: &Message) -> u64 {
    let body = String::from_utf8_lossy(&response.bytes[response.head.len()..]);
    match operation {
        "Scan" | "Query" => body
            .split("\"Count\":")
            .nth(1)
            .map(|rest| {
                rest.trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        "GetItem" => u64::from(body.contains("\"Item\"")),
        _ => 0,
    }
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

/// Reads one request or response: headers, then a `Content-Length` or chunked body.
async fn read_message(s: &mut (impl AsyncRead + Unpin)) -> Option<Message> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(i) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        bytes.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&bytes[..header_end]).into_owned();
    let chunked = header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
    if chunked {
        // Chunks until the zero-length one and the blank line after it.
        let mut at = header_end;
        loop {
            let line_end = loop {
                if let Some(i) = bytes[at..].windows(2).position(|w| w == b"\r\n") {
                    break at + i;
                }
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                bytes.extend_from_slice(&chunk[..n]);
            };
            let size_text = String::from_utf8_lossy(&bytes[at..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            // The chunk, then its CRLF (for the last chunk: the final CRLF).
            let next = line_end + 2 + size + 2;
            while bytes.len() < next {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                bytes.extend_from_slice(&chunk[..n]);
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
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            bytes.extend_from_slice(&chunk[..n]);
        }
        bytes.truncate(header_end + length);
    }
    Some(Message { head, bytes })
}
