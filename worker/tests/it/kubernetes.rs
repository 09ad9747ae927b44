//! The `kubernetes` worker-count source against a local API server stand-in that serves real
//! k8s-openapi StatefulSet JSON: a list, then a long-lived watch stream of events. The
//! worker's production path (kube `watcher`, `Api<StatefulSet>`) is used unchanged.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, WatchEvent};
use kds_worker::config::WorkerCountSource;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

const NAMESPACE: &str = "lab";
const NAME: &str = "kds-consumer";

/// The StatefulSet as the API server would return it.
fn statefulset(replicas: i32, resource_version: u64) -> StatefulSet {
    StatefulSet {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(NAMESPACE.into()),
            resource_version: Some(resource_version.to_string()),
            uid: Some("5f0c7a9e-2b1d-4c8e-9f3a-1d2e3f4a5b6c".into()),
            ..Default::default()
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(NAME.into()),
            ..Default::default()
        }),
        status: None,
    }
}

struct ApiState {
    replicas: i32,
    resource_version: u64,
    /// Requests per listening port: each worker gets its own port, so the test can tell which
    /// workers talked to the API.
    requests: HashMap<u16, Vec<String>>,
}

#[derive(Clone)]
struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    events: broadcast::Sender<String>,
}

impl FakeApi {
    fn new(replicas: i32) -> Self {
        FakeApi {
            state: Arc::new(Mutex::new(ApiState {
                replicas,
                resource_version: 100,
                requests: HashMap::new(),
            })),
            events: broadcast::channel(64).0,
        }
    }

    /// `kubectl scale statefulset kds-consumer --replicas N`, as watchers see it.
    fn scale(&self, replicas: i32) {
        let mut s = self.state.lock().unwrap();
        s.replicas = replicas;
        s.resource_version += 1;
        let event = WatchEvent::Modified(statefulset(replicas, s.resource_version));
        let _ = self
            .events
            .send(serde_json::to_string(&event).unwrap() + "\n");
    }

    fn requests_on(&self, port: u16) -> usize {
        self.state
            .lock()
            .unwrap()
            .requests
            .get(&port)
            .map_or(0, Vec::len)
    }

    fn all_requests(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .requests
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    async fn listen(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let api = api.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(addr.port(), req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    fn handle(
        &self,
        port: u16,
        req: Request<hyper::body::Incoming>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let uri = req.uri().to_string();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let mut s = self.state.lock().unwrap();
        s.requests.entry(port).or_default().push(uri);
        let expected = format!("/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets");
        if path != expected || !query.contains("fieldSelector=metadata.name%3Dkds-consumer") {
            let body = Full::new(Bytes::from(
                r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#,
            ));
            return Response::builder().status(404).body(body.boxed()).unwrap();
        }
        if query.contains("watch=true") {
            // A watch: a long-lived stream of newline-delimited WatchEvent JSON.
            let events = BroadcastStream::new(self.events.subscribe())
                .filter_map(|e| async move { e.ok() })
                .map(|line| Ok::<_, Infallible>(Frame::data(Bytes::from(line))));
            return Response::builder()
                .header("content-type", "application/json")
                .body(BoxBody::new(StreamBody::new(events)))
                .unwrap();
        }
        let list = k8s_openapi::List::<StatefulSet> {
            items: vec![statefulset(s.replicas, s.resource_version)],
            metadata: ListMeta {
                resource_version: Some(s.resource_version.to_string()),
                ..Default::default()
            },
        };
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&list).unwrap())).boxed())
            .unwrap()
    }
}

fn kube_client(addr: SocketAddr) -> kube::Client {
    let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    config.default_namespace = NAMESPACE.into();
    kube::Client::try_from(config).unwrap()
}

#[test]
fn recorded_shapes_round_trip() {
    // What the stand-in serves is what a real API server sends, per k8s-openapi.
    let json = serde_json::to_value(WatchEvent::Modified(statefulset(5, 7))).unwrap();
    assert_eq!(json["type"], "MODIFIED");
    assert_eq!(json["object"]["kind"], "StatefulSet");
    assert_eq!(json["object"]["apiVersion"], "apps/v1");
    assert_eq!(json["object"]["spec"]["replicas"], 5);
    let back: WatchEvent<StatefulSet> = serde_json::from_value(json).unwrap();
    assert_eq!(back, WatchEvent::Modified(statefulset(5, 7)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_changes_reach_lease_limits_and_min_desired_live_holds() {
    let aws = aws().await;
    let (app, stream) = (unique("k8s"), unique("k8s"));
    create_stream(&aws, &stream, 30).await;
    let api = FakeApi::new(3);

    let mut workers = Vec::new();
    let mut ports = HashMap::new();
    for i in 0..3 {
        let addr = api.listen().await;
        let mut s = settings(&app, &stream, &format!("w{i}"));
        s.worker_count_source = WorkerCountSource::Kubernetes;
        s.namespace = NAMESPACE.into();
        s.statefulset_name = NAME.into();
        let w = TestWorker::start(s, aws.clone(), Some(kube_client(addr))).await;
        ports.insert(w.id.clone(), addr.port());
        workers.push(w);
    }
    wait_for(
        Duration::from_secs(20),
        "desired 3 in lease_limits",
        || async {
            workers
                .iter()
                .all(|w| {
                    w.state.limit().is_some_and(|l| {
                        l.desired_workers == Some(3) && l.max_leases_per_worker == 10
                    })
                })
                .then_some(())
        },
    )
    .await;
    let store = meta(&aws, &app);

    // Scale down 3 -> 2: the divisor drops at once, before any pod has stopped (the watcher
    // pushes the change; how long it took is printed, a measurement rather than a test).
    api.scale(2);
    let (_, took) = wait_for(
        Duration::from_secs(5),
        "desired 2 in lease_limits",
        || async {
            let l = store.read_limit().await.ok().flatten()?;
            (l.desired_workers == Some(2)).then_some(l)
        },
    )
    .await;
    eprintln!("replica change 3 -> 2 reached lease_limits in {took:?}");
    let l = store.read_limit().await.unwrap().unwrap();
    assert_eq!(
        (l.worker_count, l.live_workers, l.max_leases_per_worker),
        (2, 3, 15)
    );

    // Scale up 2 -> 5 while only 3 workers live: min(desired, live) keeps the limit at 10.
    api.scale(5);
    let (_, took) = wait_for(
        Duration::from_secs(5),
        "desired 5 in lease_limits",
        || async {
            let l = store.read_limit().await.ok().flatten()?;
            (l.desired_workers == Some(5)).then_some(l)
        },
    )
    .await;
    eprintln!("replica change 2 -> 5 reached lease_limits in {took:?}");
    let l = store.read_limit().await.unwrap().unwrap();
    assert_eq!(
        (l.worker_count, l.live_workers, l.max_leases_per_worker),
        (3, 3, 10)
    );

    // The two new pods arrive: now 5 live, limit 6.
    for i in 3..5 {
        let addr = api.listen().await;
        let mut s = settings(&app, &stream, &format!("w{i}"));
        s.worker_count_source = WorkerCountSource::Kubernetes;
        s.namespace = NAMESPACE.into();
        let w = TestWorker::start(s, aws.clone(), Some(kube_client(addr))).await;
        ports.insert(w.id.clone(), addr.port());
        workers.push(w);
    }
    wait_limit(&workers, 6, Duration::from_secs(10)).await;

    // Only the coordinator talked to the API server, and it watched rather than polled.
    let coordinator = coordinators(&workers)[0].id.clone();
    for w in &workers {
        let n = api.requests_on(ports[&w.id]);
        if w.id == coordinator {
            assert!(n >= 2, "coordinator made {n} requests");
        } else {
            assert_eq!(n, 0, "follower {} called the Kubernetes API", w.id);
        }
    }
    let requests = api.all_requests();
    let lists = requests
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    assert!(lists <= 2, "polled instead of watching: {requests:#?}");
    for w in workers {
        w.shutdown().await;
    }
}
