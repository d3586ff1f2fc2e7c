//! A hostile cluster member, for the tests of issue 11: it holds valid cluster
//! credentials and speaks the real protocol over QUIC (the crate's own `transport` and
//! `protocol` modules), but sends whatever a test tells it to, including frames no
//! honest node would write.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use s2n_quic::connection::Handle;
use shoal::chunking::ChunkParams;
use shoal::credentials::Credentials;
use shoal::protocol::{self, Hello, Request, Response};
use shoal::store::{FeedId, FeedMark};

/// Credentials of a member of its own (named `hostile`, with a key of its own) from the
/// cluster directory `dir`: a hostile member is still a member, and says its own id.
fn member_credentials(dir: &Path) -> Credentials {
    named_member_credentials(dir, "hostile")
}

/// As [`member_credentials`], for a member named `name` (several members, several ids).
fn named_member_credentials(dir: &Path, name: &str) -> Credentials {
    let state = tempfile::tempdir().unwrap();
    Credentials::load(dir, state.path(), Some(name)).unwrap()
}

/// How long the hostile side waits for any one answer before calling the victim hung.
const ANSWER_WAIT: Duration = Duration::from_secs(20);

/// A connection to a victim node, past the `Hello` exchange.
pub struct HostileClient {
    pub runtime: tokio::runtime::Runtime,
    handle: Handle,
    // Kept open for as long as the client lives.
    _connection: s2n_quic::Connection,
    _client: s2n_quic::Client,
}

/// The runtime a hostile member runs on, and its credentials as a member.
fn member_runtime(credentials: &Path) -> (tokio::runtime::Runtime, Credentials) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (runtime, member_credentials(credentials))
}

impl HostileClient {
    /// Connects from `bind_ip` to the node at `victim` with the credentials in
    /// `credentials` and says `Hello` as a member sharing `volume`.
    pub fn connect(credentials: &Path, bind_ip: &str, victim: &str, volume: &str) -> Self {
        let (runtime, credentials) = member_runtime(credentials);
        let victim: SocketAddr = victim.parse().unwrap();
        let bind: SocketAddr = format!("{bind_ip}:0").parse().unwrap();
        let (client, connection) = runtime.block_on(async {
            let client = shoal::transport::client(bind, &credentials, true).unwrap();
            let mut last = None;
            // The victim may still be starting: a bounded number of attempts.
            for _ in 0..50 {
                match shoal::transport::connect(&client, victim).await {
                    Ok(connection) => return (client, connection),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("cannot connect to {victim}: {last:?}");
        });
        let handle = connection.handle();
        let hostile = HostileClient {
            runtime,
            handle,
            _connection: connection,
            _client: client,
        };
        let hello = Request::Hello(Hello {
            version: protocol::PROTOCOL_VERSION,
            node_id: credentials.identity.node_id,
            chunk_params: ChunkParams::DEFAULT,
            volumes: vec![volume.to_string()],
        });
        match hostile.request(&hello).as_slice() {
            [Response::Hello(_)] => {}
            other => panic!("the victim refused Hello: {other:?}"),
        }
        hostile
    }

    /// Sends one request and reads every answer frame until the victim finishes the
    /// stream.
    pub fn request(&self, request: &Request) -> Vec<Response> {
        self.try_request(request).expect("the victim answered")
    }

    /// As [`Self::request`], `None` if the victim did not finish answering in time.
    pub fn try_request(&self, request: &Request) -> Option<Vec<Response>> {
        let mut handle = self.handle.clone();
        let limit = protocol::response_limit(request);
        let request = request.clone();
        self.runtime.block_on(async move {
            tokio::time::timeout(ANSWER_WAIT, async move {
                let stream = handle.open_bidirectional_stream().await.unwrap();
                let (mut recv, mut send) = stream.split();
                protocol::write_frame(&mut send, request.encode())
                    .await
                    .unwrap();
                send.close().await.unwrap();
                let mut answers = Vec::new();
                while let Some((kind, body)) = protocol::read_frame(&mut recv, limit).await.unwrap()
                {
                    answers.push(Response::decode(kind, &body).unwrap());
                }
                answers
            })
            .await
            .ok()
        })
    }

    /// Sends several requests at once, each on its own stream, without waiting for
    /// their answers (which are read and dropped in the background).
    pub fn fire(&self, requests: Vec<Request>) {
        for request in requests {
            let mut handle = self.handle.clone();
            self.runtime.spawn(async move {
                let Ok(stream) = handle.open_bidirectional_stream().await else {
                    return;
                };
                let (mut recv, mut send) = stream.split();
                let _ = protocol::write_frame(&mut send, request.encode()).await;
                let _ = send.close().await;
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut recv, &mut sink).await;
            });
        }
    }
}

impl HostileClient {
    /// Opens `n` streams and starts a request on each that never completes (three bytes
    /// of a frame header, then nothing), then reads whatever the victim answers on each.
    /// As each stream ends, its answers are added to the returned list.
    pub fn silent_streams(&self, n: usize) -> Arc<Mutex<Vec<Vec<Response>>>> {
        let ended = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..n {
            let mut handle = self.handle.clone();
            let ended = ended.clone();
            self.runtime.spawn(async move {
                let Ok(stream) = handle.open_bidirectional_stream().await else {
                    return;
                };
                let (mut recv, mut send) = stream.split();
                if tokio::io::AsyncWriteExt::write_all(&mut send, &[100, 0, 0])
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::AsyncWriteExt::flush(&mut send).await;
                let mut answers = Vec::new();
                let limit = protocol::MAX_CONTROL_FRAME;
                while let Ok(Some((kind, body))) = protocol::read_frame(&mut recv, limit).await {
                    answers.extend(Response::decode(kind, &body).ok());
                }
                ended.lock().unwrap().push(answers);
                // The request stays unfinished until the victim has ended the stream.
                drop(send);
            });
        }
        ended
    }
}

/// Many connections to a victim from one member, none of which says `Hello`; held
/// open (the client's keep-alives) until dropped.
pub struct Flood {
    pub runtime: tokio::runtime::Runtime,
    connections: Vec<s2n_quic::Connection>,
    _client: s2n_quic::Client,
}

impl Flood {
    /// Opens `n` connections from `bind_ip` to `victim` (those the victim refuses at
    /// once count as well: they are closed by it).
    pub fn connect(credentials: &Path, bind_ip: &str, victim: &str, n: usize) -> Self {
        let (runtime, credentials) = member_runtime(credentials);
        let victim: SocketAddr = victim.parse().unwrap();
        let bind: SocketAddr = format!("{bind_ip}:0").parse().unwrap();
        let (client, connections) = runtime.block_on(async {
            let client = shoal::transport::client(bind, &credentials, true).unwrap();
            let mut connections = Vec::new();
            for _ in 0..n {
                if let Ok(Ok(connection)) =
                    tokio::time::timeout(ANSWER_WAIT, shoal::transport::connect(&client, victim))
                        .await
                {
                    connections.push(connection);
                }
            }
            (client, connections)
        });
        Flood {
            runtime,
            connections,
            _client: client,
        }
    }

    /// How many of the connections are still open (a stream can be opened on them).
    pub fn open(&self) -> usize {
        let handles: Vec<Handle> = self.connections.iter().map(|c| c.handle()).collect();
        self.runtime.block_on(async move {
            let mut open = 0;
            for mut handle in handles {
                let opened = tokio::time::timeout(
                    Duration::from_secs(1),
                    handle.open_bidirectional_stream(),
                )
                .await;
                open += usize::from(matches!(opened, Ok(Ok(_))));
            }
            open
        })
    }
}

/// Whether `GET /healthz` on `http_addr` answers 200 within one second.
pub fn healthy_within_a_second(http_addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = http_addr.parse() else {
        return false;
    };
    let second = Duration::from_secs(1);
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, second) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(second));
    if write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    raw.starts_with("HTTP/1.1 200")
}

/// What a [`HostileServer`] answers: every response frame for one request.
pub type Answer = Box<dyn Fn(&Request) -> Vec<Response> + Send + Sync>;

/// Where a [`HostileServer`]'s change feed is, as it answers a victim that asks
/// (`GetChanges` with feed id 0, before every walk).
pub const HOSTILE_FEED_MARK: FeedMark = FeedMark {
    feed: FeedId(0x5eed),
    seq: 10,
};

/// A hostile cluster member that victims pull from: it listens with valid credentials,
/// answers `Hello` as a member sharing the volume, the question where its change feed
/// is with [`HOSTILE_FEED_MARK`], and every other request with what the test's
/// `answer` says. It counts the requests it saw.
pub struct HostileServer {
    pub runtime: tokio::runtime::Runtime,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Request>>>,
}

impl HostileServer {
    pub fn start(credentials: &Path, listen: &str, volume: &str, answer: Answer) -> Self {
        let (runtime, credentials) = member_runtime(credentials);
        let listen: SocketAddr = listen.parse().unwrap();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let hello = Hello {
            version: protocol::PROTOCOL_VERSION,
            node_id: credentials.identity.node_id,
            chunk_params: ChunkParams::DEFAULT,
            volumes: vec![volume.to_string()],
        };
        let answer = std::sync::Arc::new(answer);
        let seen = requests.clone();
        runtime.spawn(async move {
            let mut server = shoal::transport::listen(listen, &credentials, true).unwrap();
            while let Some(mut connection) = server.accept().await {
                let (answer, seen, hello) = (answer.clone(), seen.clone(), hello.clone());
                tokio::spawn(async move {
                    while let Ok(Some(stream)) = connection.accept_bidirectional_stream().await {
                        let (answer, seen, hello) = (answer.clone(), seen.clone(), hello.clone());
                        tokio::spawn(async move {
                            let (mut recv, mut send) = stream.split();
                            let limit = protocol::MAX_CONTROL_FRAME;
                            let Ok(Some((kind, body))) =
                                protocol::read_frame(&mut recv, limit).await
                            else {
                                return;
                            };
                            let Ok(request) = Request::decode(kind, &body) else {
                                return;
                            };
                            let responses = match &request {
                                Request::Hello(_) => vec![Response::Hello(hello)],
                                Request::GetChanges { since, .. } if since.feed == FeedId(0) => {
                                    vec![Response::ChangesGone {
                                        current: HOSTILE_FEED_MARK,
                                    }]
                                }
                                other => answer(other),
                            };
                            seen.lock().unwrap().push(request);
                            for response in responses {
                                if protocol::write_frame(&mut send, response.encode())
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            let _ = send.close().await;
                        });
                    }
                });
            }
        });
        HostileServer { runtime, requests }
    }

    /// How many requests of the kind `matches` picks the victim sent so far.
    pub fn count(&self, matches: impl Fn(&Request) -> bool) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matches(r))
            .count()
    }
}

/// What one stream of a [`Siege`] does: it never reads an answer and never ends.
#[derive(Clone)]
pub enum Stalled {
    /// The header of a request frame of `len` bytes and all of it but the last byte.
    Unfinished { len: usize },
    /// A whole request, whose answer is never read.
    Unread(Request),
}

/// Several members at once, each with as many connections to a victim as it is served
/// (`per_member`), each past the `Hello` exchange: the most a group of hostile members
/// can bring to bear on one node's serving side. Everything stays open until dropped.
pub struct Siege {
    pub runtime: tokio::runtime::Runtime,
    handles: Vec<Handle>,
    per_member: usize,
    _connections: Vec<s2n_quic::Connection>,
    _clients: Vec<s2n_quic::Client>,
}

impl Siege {
    /// `members` members (`siege-0`, `siege-1`, ...) from `bind_ip`, each with
    /// `per_member` connections to `victim`, each greeted as a member sharing `volume`.
    pub fn connect(
        credentials: &Path,
        bind_ip: &str,
        victim: &str,
        volume: &str,
        members: usize,
        per_member: usize,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let victim: SocketAddr = victim.parse().unwrap();
        let bind: SocketAddr = format!("{bind_ip}:0").parse().unwrap();
        let mut clients = Vec::new();
        let mut connections = Vec::new();
        for member in 0..members {
            let credentials = named_member_credentials(credentials, &format!("siege-{member}"));
            let hello = Request::Hello(Hello {
                version: protocol::PROTOCOL_VERSION,
                node_id: credentials.identity.node_id,
                chunk_params: ChunkParams::DEFAULT,
                volumes: vec![volume.to_string()],
            });
            runtime.block_on(async {
                let client = shoal::transport::client(bind, &credentials, true).unwrap();
                for _ in 0..per_member {
                    let connection = tokio::time::timeout(
                        ANSWER_WAIT,
                        shoal::transport::connect(&client, victim),
                    )
                    .await
                    .expect("connected in time")
                    .expect("connected");
                    let answers = exchange(connection.handle(), &hello).await;
                    assert!(
                        matches!(answers.as_slice(), [Response::Hello(_)]),
                        "the victim refused Hello: {answers:?}"
                    );
                    connections.push(connection);
                }
                clients.push(client);
            });
        }
        Siege {
            handles: connections.iter().map(|c| c.handle()).collect(),
            per_member,
            runtime,
            _connections: connections,
            _clients: clients,
        }
    }

    /// How many connections the siege holds.
    pub fn connections(&self) -> usize {
        self.handles.len()
    }

    /// On every connection (the `c`-th of its member's), opens the streams `stall(c)`
    /// lists, each doing what it says; they stay as they are until the siege is dropped
    /// (a stream the victim ends is not opened again).
    pub fn stall(&self, stall: impl Fn(usize) -> Vec<Stalled>) {
        for (at, handle) in self.handles.iter().enumerate() {
            for stalled in stall(at % self.per_member) {
                let mut handle = handle.clone();
                self.runtime.spawn(async move {
                    let Ok(stream) = handle.open_bidirectional_stream().await else {
                        return;
                    };
                    let (recv, mut send) = stream.split();
                    let _ = match stalled {
                        Stalled::Unfinished { len } => {
                            // The length (kind byte and body), GetDir's kind (0x02),
                            // and all of the body but its last byte.
                            let mut frame = Vec::with_capacity(len + 3);
                            frame.extend_from_slice(&(len as u32).to_le_bytes());
                            frame.push(0x02);
                            frame.resize(len + 3, 0);
                            tokio::io::AsyncWriteExt::write_all(&mut send, &frame).await
                        }
                        Stalled::Unread(request) => {
                            let _ = protocol::write_frame(&mut send, request.encode()).await;
                            send.finish().map_err(std::io::Error::other)
                        }
                    };
                    // The answer is never read; an unfinished request never completed.
                    std::future::pending::<()>().await;
                    drop((recv, send));
                });
            }
        }
    }
}

/// Sends `request` on a new stream of `handle` and reads every answer frame.
async fn exchange(mut handle: Handle, request: &Request) -> Vec<Response> {
    let limit = protocol::response_limit(request);
    let stream = handle.open_bidirectional_stream().await.unwrap();
    let (mut recv, mut send) = stream.split();
    protocol::write_frame(&mut send, request.encode())
        .await
        .unwrap();
    send.close().await.unwrap();
    let mut answers = Vec::new();
    while let Some((kind, body)) = protocol::read_frame(&mut recv, limit).await.unwrap() {
        answers.push(Response::decode(kind, &body).unwrap());
    }
    answers
}
