//! QUIC endpoints with mutual TLS: the only way bytes reach another node.
//!
//! Every node runs one server (accepting peers) and one client (connecting to peers),
//! both built from the cluster credentials: each side trusts only the cluster CA (the
//! system trust store is emptied), each side must present a certificate signed by it,
//! and the ALPN names the protocol version (every version this build speaks is offered;
//! the newest both sides speak is chosen: [`crate::protocol::VERSIONS`]). A peer without such a certificate fails the
//! handshake before it can open a stream.
//!
//! Each endpoint records, per connection, what the peer's verified certificate proves
//! ([`crate::identity::peer_identity`] reads it): which node is at the other end is
//! decided by its certificate, never by what it says.
//!
//! The signer's endpoints ([`signer_listen`], [`enroll_client`]) are the exception to
//! mutual TLS: an enrolling node has no certificate yet, so only the signer proves who
//! it is (a CA-issued certificate naming [`SIGNER_SERVER_NAME`]), on its own port and
//! ALPN ([`crate::enroll`]).
//!
//! The client side also records, per connection, when its peer was last heard and
//! whether it owes an acknowledgement ([`RecordHearing`]): [`is_silent`] tells a peer
//! that stopped answering within a few hundred milliseconds (keep-alive PINGs every
//! half second ask idle peers too), where the idle timeout takes seconds, so that what
//! another peer can answer is asked of that one instead.
//!
//! The transport knows nothing of files or volumes: it hands out connections, on which
//! [`crate::protocol`] opens one bidirectional stream per request.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use s2n_quic::client::Connect;
use s2n_quic::connection::Handle;
use s2n_quic::provider::event::{ConnectionInfo, ConnectionMeta, Subscriber, events};
use s2n_quic::provider::limits::Limits;
use s2n_quic::provider::tls::default::callbacks::VerifyHostNameCallback;
use s2n_quic::provider::tls::s2n_tls::{self, ConfigLoader, ConnectionContext};
use s2n_quic::{Client, Connection, Server};

use crate::credentials::{CLUSTER_SERVER_NAME, Credentials, SIGNER_SERVER_NAME};
use crate::identity::RecordPeerCertificate;

/// Streams this node may have open on one connection to a peer (its requests in
/// flight; a pull has at most 32 chunk-list and 16 `GetChunks` requests at once).
const MAX_STREAMS: u64 = 256;

/// Streams a peer may have open on one connection it made to this node (requests this
/// node serves at once on it). A requester past it waits for a stream to end (QUIC's
/// stream credit), it is not refused.
pub const MAX_SERVED_STREAMS: u64 = 64;

/// Request bytes a peer may have sent on one connection and this node not yet read
/// (QUIC's connection flow-control window, on the serving side; per stream, half of
/// it). Requests are small (a `GetChunks` of 64 ids is 2 KiB); a large one, up to a
/// control frame, simply takes a few more round trips. Bounds what s2n-quic buffers for
/// streams whose requests wait for the responder's budget.
pub const SERVED_REQUEST_WINDOW: u64 = 256 << 10;

/// A connection that hears nothing from its peer for this long is closed, so a peer that
/// stopped (a frozen process, a cut network) is noticed in seconds; the client side sends
/// keep-alive PINGs so an idle but live connection stays open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the client side of a connection that carries nothing waits before it sends
/// a PING. Each PING asks for an acknowledgement, so an idle connection to a peer that
/// stopped answering is known silent ([`is_silent`]) within this and [`ACK_GRACE`],
/// long before the idle timeout closes it. (Two small packets per connection and half
/// second; the PING timer restarts with every packet that carries something.)
const KEEP_ALIVE: Duration = Duration::from_millis(500);

/// How long a live peer may take to acknowledge a packet that asks for it (a request, a
/// PING): QUIC's acknowledgement delay (25 ms by default) and a round trip, with room for
/// a loaded machine's scheduling. Past it, the peer is silent.
pub const ACK_GRACE: Duration = Duration::from_millis(250);

/// A peer heard from longer ago than this is silent, whatever it was asked: a backstop
/// to [`ACK_GRACE`] (a live idle peer is heard every [`KEEP_ALIVE`]).
const HEARD_WITHIN: Duration = Duration::from_secs(2);

/// The round trip assumed before one is measured (RFC 9002's default is 333 ms). It
/// times the retransmission of a handshake's first packet: a node that starts while its
/// peer is not listening yet (both started together, the peer still scanning) has its
/// first packets dropped, and tried again after about three times this, doubling, so
/// the default cost a second before the peer was reached (unless the peer greets this
/// node first, which restarts the attempt: `serve::peer_loop`). Cluster peers are mostly in
/// one data center, well under it; on a slower path the cost is a first packet sent
/// twice, and the measured round trip takes over at once.
const INITIAL_RTT: Duration = Duration::from_millis(50);

/// Largest IP packet s2n-quic may probe for. Paths that carry jumbo frames (loopback,
/// some data-center networks) then move several times fewer packets per byte; smaller
/// paths simply fail the probes and stay at what works.
const MAX_MTU: u16 = 9000;

/// Kernel buffer asked for on each side of the UDP socket. The default
/// (`net.core.rmem_default`, about 208 KiB) holds only a few milliseconds of a bulk
/// transfer: while the receiving task hashes and writes, the kernel drops datagrams
/// (`RcvbufErrors` in `/proc/net/snmp`), which cost retransmissions and make the
/// congestion controller back off. Root may go past `rmem_max`/`wmem_max`
/// (`SO_RCVBUFFORCE`); otherwise the kernel caps the request at those.
const SOCKET_BUFFER: usize = 16 << 20;

/// s2n-quic's own ring of received datagrams, between the socket and the endpoint (8 MiB
/// by default, each endpoint: two per node, most of it resident once a bulk transfer
/// went through). The kernel's socket buffer ([`SOCKET_BUFFER`]) is what absorbs a
/// burst while the endpoint is busy; this ring only hands batches over (32 slots of up
/// to 64 KiB with GRO), so a quarter of the default costs no throughput and keeps 12 MiB
/// off each node's resident memory.
const RECEIVE_RING: usize = 2 << 20;

/// `gso`: segmentation offload, which some container networks break (s2n-quic issue
/// 2485); off, every packet is one send.
fn io(addr: SocketAddr, gso: bool) -> std::io::Result<s2n_quic::provider::io::Default> {
    s2n_quic::provider::io::Default::builder()
        .with_rx_socket(udp_socket(addr)?)?
        .with_internal_recv_buffer_size(RECEIVE_RING)?
        .with_max_mtu(MAX_MTU)?
        .with_gso(gso)?
        .build()
}

/// The endpoint's UDP socket (one for receiving and sending), bound to `addr`, with
/// buffers of [`SOCKET_BUFFER`] where the kernel grants them.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    if sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER)?;
    }
    if sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        sockopt::set_socket_send_buffer_size(&socket, SOCKET_BUFFER)?;
    }
    tracing::debug!(
        %addr,
        receive_buffer = sockopt::socket_recv_buffer_size(&socket).unwrap_or(0),
        send_buffer = sockopt::socket_send_buffer_size(&socket).unwrap_or(0),
        "UDP socket buffers"
    );
    Ok(socket)
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid cluster credentials: {0}")]
    Credentials(String),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: SocketAddr, message: String },
    #[error("cannot start the QUIC client on {addr}: {message}")]
    Client { addr: SocketAddr, message: String },
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
}

/// Accepts client certificates that carry the cluster's node name (the CA signature has
/// already been checked by then).
struct ClusterNodeName;

impl VerifyHostNameCallback for ClusterNodeName {
    fn verify_host_name(&self, host_name: &str) -> bool {
        host_name == CLUSTER_SERVER_NAME
    }
}

fn limits() -> Result<Limits, String> {
    Limits::new()
        .with_max_open_local_bidirectional_streams(MAX_STREAMS)
        .and_then(|l| l.with_max_open_remote_bidirectional_streams(MAX_STREAMS))
        .and_then(|l| l.with_max_idle_timeout(IDLE_TIMEOUT))
        .and_then(|l| l.with_max_keep_alive_period(KEEP_ALIVE))
        .and_then(|l| l.with_initial_round_trip_time(INITIAL_RTT))
        .map_err(|e| e.to_string())
}

/// The serving side's limits: fewer streams and small receive windows (see
/// [`MAX_SERVED_STREAMS`], [`SERVED_REQUEST_WINDOW`]).
fn server_limits() -> Result<Limits, String> {
    limits()?
        .with_max_open_remote_bidirectional_streams(MAX_SERVED_STREAMS)
        .and_then(|l| l.with_data_window(SERVED_REQUEST_WINDOW))
        .and_then(|l| l.with_bidirectional_remote_data_window(SERVED_REQUEST_WINDOW / 2))
        .map_err(|e| e.to_string())
}

/// The s2n-quic event subscriber that keeps, per connection, when its peer was last
/// heard and whether it owes an acknowledgement: what [`is_silent`] reads.
pub struct RecordHearing;

/// What a connection heard from its peer.
pub struct Hearing {
    /// When the last packet from the peer arrived (or the connection began).
    last_heard: Instant,
    /// When the first packet that asks for an acknowledgement (a request, a PING) went
    /// out after `last_heard`: a live peer answers it within [`ACK_GRACE`].
    unanswered_since: Option<Instant>,
}

impl Hearing {
    fn is_silent(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_heard) > HEARD_WITHIN
            || self
                .unanswered_since
                .is_some_and(|sent| now.saturating_duration_since(sent) > ACK_GRACE)
    }
}

impl Subscriber for RecordHearing {
    type ConnectionContext = Hearing;

    fn create_connection_context(
        &mut self,
        _meta: &ConnectionMeta,
        _info: &ConnectionInfo,
    ) -> Hearing {
        Hearing {
            last_heard: Instant::now(),
            unanswered_since: None,
        }
    }

    fn on_packet_received(
        &mut self,
        context: &mut Hearing,
        _meta: &ConnectionMeta,
        _event: &events::PacketReceived,
    ) {
        context.last_heard = Instant::now();
        context.unanswered_since = None;
    }

    fn on_frame_sent(
        &mut self,
        context: &mut Hearing,
        _meta: &ConnectionMeta,
        event: &events::FrameSent,
    ) {
        // Every frame but these asks the peer to acknowledge its packet (RFC 9002, 2).
        let asks = !matches!(
            event.frame,
            events::Frame::Ack { .. }
                | events::Frame::Padding { .. }
                | events::Frame::ConnectionClose { .. }
        );
        if asks && context.unanswered_since.is_none() {
            context.unanswered_since = Some(Instant::now());
        }
    }
}

/// Whether the peer of a connection this node opened has gone silent: it left a packet
/// unacknowledged for [`ACK_GRACE`], or was not heard for [`HEARD_WITHIN`]. A frozen or
/// cut-off peer is silent within a few hundred milliseconds of being asked anything
/// (and, idle, within [`KEEP_ALIVE`] more), where the idle timeout takes 5 s. `false`
/// when the connection cannot say (it is closed: requests on it fail at once).
pub fn is_silent(connection: &Handle) -> bool {
    let now = Instant::now();
    connection
        .query_event_context(|hearing: &Hearing| hearing.is_silent(now))
        .unwrap_or(false)
}

type TlsServer = s2n_quic::provider::tls::default::Server;
type TlsClient = s2n_quic::provider::tls::default::Client;

/// A node's TLS configuration for its two endpoints, replaceable while they run
/// (certificate renewal): every new handshake, either way, uses the newest; connections
/// already open keep the one they were made with, so nothing in flight is dropped.
#[derive(Clone)]
pub struct NodeTls {
    server: Arc<Mutex<TlsServer>>,
    client: Arc<Mutex<TlsClient>>,
}

impl NodeTls {
    pub fn new(credentials: &Credentials) -> Result<Self, TransportError> {
        Ok(NodeTls {
            server: Arc::new(Mutex::new(server_tls(credentials)?)),
            client: Arc::new(Mutex::new(client_tls(credentials)?)),
        })
    }

    /// From now on, new connections present `credentials`.
    pub fn replace(&self, credentials: &Credentials) -> Result<(), TransportError> {
        let (server, client) = (server_tls(credentials)?, client_tls(credentials)?);
        *self.server.lock().expect("tls lock") = server;
        *self.client.lock().expect("tls lock") = client;
        Ok(())
    }
}

/// Hands each new connection the configuration current at its start.
struct Current<T>(Arc<Mutex<T>>);

impl<T: ConfigLoader> ConfigLoader for Current<T> {
    fn load(&mut self, cx: ConnectionContext) -> s2n_tls::config::Config {
        self.0.lock().expect("tls lock").load(cx)
    }
}

fn cred_err(e: s2n_quic::provider::tls::default::error::Error) -> TransportError {
    TransportError::Credentials(e.to_string())
}

fn server_tls(credentials: &Credentials) -> Result<TlsServer, TransportError> {
    TlsServer::builder()
        .with_empty_trust_store()
        .map_err(cred_err)?
        .with_trusted_certificate(credentials.ca_pem.as_str())
        .map_err(cred_err)?
        .with_certificate(credentials.cert_pem.as_str(), credentials.key_pem.as_str())
        .map_err(cred_err)?
        .with_client_authentication()
        .map_err(cred_err)?
        .with_verify_host_name_callback(ClusterNodeName)
        .map_err(cred_err)?
        .with_application_protocols(crate::protocol::alpns())
        .map_err(cred_err)?
        .build()
        .map_err(cred_err)
}

fn client_tls(credentials: &Credentials) -> Result<TlsClient, TransportError> {
    TlsClient::builder()
        .with_empty_trust_store()
        .map_err(cred_err)?
        .with_certificate(credentials.ca_pem.as_str())
        .map_err(cred_err)?
        .with_client_identity(credentials.cert_pem.as_str(), credentials.key_pem.as_str())
        .map_err(cred_err)?
        .with_application_protocols(crate::protocol::alpns())
        .map_err(cred_err)?
        .build()
        .map_err(cred_err)
}

/// Starts the server side on `listen`, with fixed credentials.
pub fn listen(
    listen: SocketAddr,
    credentials: &Credentials,
    gso: bool,
) -> Result<Server, TransportError> {
    listen_with(listen, &NodeTls::new(credentials)?, gso)
}

/// Starts the server side on `listen`, presenting whatever `tls` holds at each handshake.
pub fn listen_with(listen: SocketAddr, tls: &NodeTls, gso: bool) -> Result<Server, TransportError> {
    let listen_err = |message: String| TransportError::Listen {
        addr: listen,
        message,
    };
    Server::builder()
        .with_tls(s2n_tls::Server::from_loader(Current(tls.server.clone())))
        .map_err(|e| listen_err(e.to_string()))?
        .with_io(io(listen, gso).map_err(|e| listen_err(e.to_string()))?)
        .map_err(|e| listen_err(e.to_string()))?
        .with_limits(server_limits().map_err(listen_err)?)
        .map_err(|e| listen_err(e.to_string()))?
        .with_event(RecordPeerCertificate)
        .map_err(|e| listen_err(e.to_string()))?
        .start()
        .map_err(|e| listen_err(e.to_string()))
}

/// Starts the client side, sending from `bind` (an address of the same family as the
/// peers, port 0 for any), with fixed credentials.
pub fn client(
    bind: SocketAddr,
    credentials: &Credentials,
    gso: bool,
) -> Result<Client, TransportError> {
    client_with(bind, &NodeTls::new(credentials)?, gso)
}

/// Starts the client side, presenting whatever `tls` holds at each handshake.
pub fn client_with(bind: SocketAddr, tls: &NodeTls, gso: bool) -> Result<Client, TransportError> {
    let listen_err = |message: String| TransportError::Client {
        addr: bind,
        message,
    };
    Client::builder()
        .with_tls(s2n_tls::Client::from_loader(Current(tls.client.clone())))
        .map_err(|e| listen_err(e.to_string()))?
        .with_io(io(bind, gso).map_err(|e| listen_err(e.to_string()))?)
        .map_err(|e| listen_err(e.to_string()))?
        .with_limits(limits().map_err(listen_err)?)
        .map_err(|e| listen_err(e.to_string()))?
        .with_event((RecordPeerCertificate, RecordHearing))
        .map_err(|e| listen_err(e.to_string()))?
        .start()
        .map_err(|e| listen_err(e.to_string()))
}

/// Connects to a peer and completes the mutual-TLS handshake.
pub async fn connect(client: &Client, addr: SocketAddr) -> Result<Connection, TransportError> {
    let connect = Connect::new(addr).with_server_name(CLUSTER_SERVER_NAME);
    let mut connection = client
        .connect(connect)
        .await
        .map_err(|e| TransportError::Connect {
            addr,
            message: e.to_string(),
        })?;
    connection
        .keep_alive(true)
        .map_err(|e| TransportError::Connect {
            addr,
            message: e.to_string(),
        })?;
    Ok(connection)
}

/// Streams an enrolling node may have open on one connection to the signer.
const SIGNER_MAX_STREAMS: u64 = 4;

/// Starts the signer's endpoint on `listen`: server authentication only (`cert_pem`,
/// `key_pem`: the signer's certificate), ALPN `shoal-enroll/1`.
pub fn signer_listen(
    listen: SocketAddr,
    (cert_pem, key_pem): (&str, &str),
    gso: bool,
) -> Result<Server, TransportError> {
    let tls = TlsServer::builder()
        .with_certificate(cert_pem, key_pem)
        .map_err(cred_err)?
        .with_application_protocols([crate::enroll::ALPN])
        .map_err(cred_err)?
        .build()
        .map_err(cred_err)?;
    let listen_err = |message: String| TransportError::Listen {
        addr: listen,
        message,
    };
    let limits = Limits::new()
        .with_max_open_remote_bidirectional_streams(SIGNER_MAX_STREAMS)
        .and_then(|l| l.with_max_idle_timeout(IDLE_TIMEOUT))
        .map_err(|e| listen_err(e.to_string()))?;
    Server::builder()
        .with_tls(tls)
        .map_err(|e| listen_err(e.to_string()))?
        .with_io(io(listen, gso).map_err(|e| listen_err(e.to_string()))?)
        .map_err(|e| listen_err(e.to_string()))?
        .with_limits(limits)
        .map_err(|e| listen_err(e.to_string()))?
        .start()
        .map_err(|e| listen_err(e.to_string()))
}

/// A client for the signer: trusts only `ca_pem`, presents no certificate, speaks
/// `shoal-enroll/1`.
pub fn enroll_client(bind: SocketAddr, ca_pem: &str, gso: bool) -> Result<Client, TransportError> {
    let tls = TlsClient::builder()
        .with_empty_trust_store()
        .map_err(cred_err)?
        .with_certificate(ca_pem)
        .map_err(cred_err)?
        .with_application_protocols([crate::enroll::ALPN])
        .map_err(cred_err)?
        .build()
        .map_err(cred_err)?;
    let client_err = |message: String| TransportError::Client {
        addr: bind,
        message,
    };
    Client::builder()
        .with_tls(tls)
        .map_err(|e| client_err(e.to_string()))?
        .with_io(io(bind, gso).map_err(|e| client_err(e.to_string()))?)
        .map_err(|e| client_err(e.to_string()))?
        .with_limits(limits().map_err(client_err)?)
        .map_err(|e| client_err(e.to_string()))?
        .start()
        .map_err(|e| client_err(e.to_string()))
}

/// Connects to the signer at `addr`, which must prove [`SIGNER_SERVER_NAME`].
pub async fn connect_signer(
    client: &Client,
    addr: SocketAddr,
) -> Result<Connection, TransportError> {
    let connect = Connect::new(addr).with_server_name(SIGNER_SERVER_NAME);
    client
        .connect(connect)
        .await
        .map_err(|e| TransportError::Connect {
            addr,
            message: e.to_string(),
        })
}
