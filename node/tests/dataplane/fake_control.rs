//! A scripted stand-in for the control plane's Resources service: each
//! Watch call plays the next script; Apply records Node registrations.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use strait_proto::v1::resources_server::{Resources, ResourcesServer};
use strait_proto::v1::{
    ApplyRequest, ApplyResponse, DeleteRequest, DeleteResponse, EventType, GetRequest, GetResponse,
    ListRequest, ListResponse, Object, WatchEvent, WatchRequest, WatchResponse,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

enum Script {
    /// Send these responses; keep the stream open afterwards if `hold`.
    Stream(Vec<WatchResponse>, bool),
    Fail(Status),
}

#[derive(Default)]
struct Inner {
    scripts: Mutex<VecDeque<Script>>,
    revisions: Mutex<Vec<u64>>,
    nodes: Mutex<Vec<String>>,
    held: Mutex<Vec<mpsc::Sender<Result<WatchResponse, Status>>>>,
}

#[derive(Clone, Default)]
struct Svc(Arc<Inner>);

pub struct FakeControl {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeControl {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = Svc::default();
        let inner = svc.0.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ResourcesServer::new(svc))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            inner,
            stop,
            server,
        }
    }

    pub fn script_initial(&self, revision: u64, objects: Vec<Object>, hold: bool) {
        let events = objects
            .into_iter()
            .map(|o| WatchEvent {
                r#type: EventType::Added as i32,
                object: Some(o),
            })
            .collect();
        let resp = WatchResponse {
            revision,
            events,
            initial: true,
            commit_time_unix_nanos: 0,
        };
        self.push(Script::Stream(vec![resp], hold));
    }

    pub fn script_compacted(&self) {
        self.push(Script::Fail(Status::failed_precondition(
            "compacted: revision 5 is older than the oldest retained revision 7; re-list",
        )));
    }

    fn push(&self, s: Script) {
        self.inner.scripts.lock().expect("lock").push_back(s);
    }

    pub fn watch_revisions(&self) -> Vec<u64> {
        self.inner.revisions.lock().expect("lock").clone()
    }

    pub fn registered_nodes(&self) -> Vec<String> {
        self.inner.nodes.lock().expect("lock").clone()
    }

    pub async fn stop(self) {
        self.inner.held.lock().expect("lock").clear();
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Resources for Svc {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let object = req.into_inner().object;
        if let Some(o) = &object {
            self.0
                .nodes
                .lock()
                .expect("lock")
                .push(o.name().to_string());
        }
        Ok(Response::new(ApplyResponse {
            object,
            result: "created".into(),
            revision: 1,
        }))
    }

    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(Status::unimplemented("get"))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("list"))
    }

    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Err(Status::unimplemented("delete"))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let req = req.into_inner();
        assert_eq!(req.kinds, ["Service", "EndpointSlice"]);
        self.0.revisions.lock().expect("lock").push(req.revision);
        let script = self.0.scripts.lock().expect("lock").pop_front();
        let (tx, rx) = mpsc::channel(16);
        match script {
            Some(Script::Fail(status)) => return Err(status),
            Some(Script::Stream(responses, hold)) => {
                for r in responses {
                    tx.try_send(Ok(r)).expect("queue");
                }
                if hold {
                    self.0.held.lock().expect("lock").push(tx);
                }
            }
            // Out of script: an open stream with nothing on it.
            None => self.0.held.lock().expect("lock").push(tx),
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
