//! Test servers on threads of their own.

use std::net::{Ipv4Addr, SocketAddr};

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use tokio::net::TcpListener;

/// Serves HTTP/1.1 with `service` on every connection `listener` accepts, until dropped. The
/// local mode's server (`s3spot::local::s3::serve`) has the same loop: this crate depends on no
/// s3spot crate, so that building the servers builds nothing of s3spot's.
pub(crate) async fn serve<S, B>(listener: TcpListener, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A server on its own thread and runtime: usable from plain and async tests alike, and never
/// starved by the test's own work. It stops when the returned handle is dropped.
pub(crate) struct ServerThread {
    pub(crate) address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    pub(crate) fn start<S, B>(name: &str, service: S) -> ServerThread
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Self::start_on(name, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), service)
    }

    /// On `address`, for a server that must be where a client looks without being told (IMDS
    /// at 169.254.169.254:80, in a network namespace of the test's own).
    pub(crate) fn start_on<S, B>(name: &str, address: SocketAddr, service: S) -> ServerThread
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (bound, bound_address) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for the test server");
                runtime.block_on(async move {
                    let listener = TcpListener::bind(address)
                        .await
                        .unwrap_or_else(|error| panic!("cannot bind {address}: {error}"));
                    bound
                        .send(listener.local_addr().expect("bound address"))
                        .expect("the starter waits");
                    tokio::select! {
                        () = serve(listener, service) => {}
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawn the server thread");
        ServerThread {
            address: bound_address.recv().expect("the server binds"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The parameters of an AWS Query-protocol request (EC2, IAM, STS): its form-encoded body.
pub(crate) async fn query_params(request: Request<Incoming>) -> Vec<(String, String)> {
    use http_body_util::BodyExt as _;
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The value of the Query parameter `name`.
pub(crate) fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
