//! Peer discovery: which addresses this node mirrors with, as they come and go.
//!
//! Three modes (`MODE`, `--mode`, `mode = ".."`):
//! - `static`: the configured peer list (`--peer`, `SHOAL_PEERS`): `HOST:PORT` each,
//!   names resolved again every `HEARTBEAT`. A name that does not resolve yet (in
//!   compose, another service's name resolves only once its container runs) is not
//!   fatal: it is said once and retried with backoff from [`RESOLVE_FIRST_RETRY`] up to
//!   the heartbeat, while the peers that do resolve are synced with.
//! - `docker` (plain Docker, no Swarm): the running containers that carry the same
//!   `shoal.cluster` label as this one, at their addresses on the user-defined networks
//!   they share with it; listed through the Docker API (the socket, mounted read-only).
//! - `swarm`: the other tasks of this container's own service, from Docker's embedded
//!   DNS for `tasks.<service>`, polled every [`DNS_POLL`]. The service is named by
//!   `SHOAL_SERVICE` (the stack sets it to `{{.Service.Name}}`), which needs no Docker
//!   socket: a socket, even read-only, is root on the host, and a network-facing daemon
//!   should not hold it. Where an operator mounts the socket anyway, it only makes joins
//!   noticed sooner (local events wake a look) and adds the verbose inspection of the
//!   overlay networks (each service's task endpoints); without `SHOAL_SERVICE` the
//!   socket is required, to read the service from the container's
//!   `com.docker.swarm.service.name` label.
//!
//! The Docker API modes look again every `HEARTBEAT` and at once on every local
//! container or network event (start, die, connect, disconnect...), so a joining or
//! leaving peer is noticed without waiting; this container's own addresses are never
//! peers. The result
//! is published as the whole current set on a [`watch`] channel; the daemon starts and
//! stops one peer task per address as the set changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{
    EventsOptionsBuilder, InspectContainerOptions, InspectNetworkOptionsBuilder,
    ListContainersOptionsBuilder,
};
use futures_util::StreamExt;
use hickory_resolver::TokioResolver;
use tokio::sync::watch;

/// The label that groups containers into one cluster in `MODE=docker`.
pub const CLUSTER_LABEL: &str = "shoal.cluster";
/// The label Swarm puts on every task container: its service's name.
pub const SERVICE_LABEL: &str = "com.docker.swarm.service.name";
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Docker events arrive in bursts (a container start brings network connects): wait this
/// long after one before looking, so one look covers the burst.
const EVENT_SETTLE: Duration = Duration::from_millis(300);
const DOCKER_TIMEOUT_SECS: u64 = 30;
/// How often `MODE=swarm` asks DNS for the service's tasks (at most; less often if the
/// heartbeat is shorter).
pub const DNS_POLL: Duration = Duration::from_secs(2);
/// The first wait before a static peer name that did not resolve is tried again; it
/// doubles up to the heartbeat.
pub const RESOLVE_FIRST_RETRY: Duration = Duration::from_millis(500);
/// How long one name resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Static,
    Docker,
    Swarm,
}

impl std::str::FromStr for Mode {
    type Err = DiscoveryError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "static" => Ok(Mode::Static),
            "docker" => Ok(Mode::Docker),
            "swarm" => Ok(Mode::Swarm),
            _ => Err(DiscoveryError::UnknownMode(text.to_string())),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Static => "static",
            Mode::Docker => "docker",
            Mode::Swarm => "swarm",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("unknown MODE {0:?}: expected swarm, docker or static")]
    UnknownMode(String),
    #[error("peer {0:?}: expected HOST:PORT (a name or an address, and the port it listens on)")]
    PeerFormat(String),
    #[error(
        "MODE={mode} finds peers through the Docker API, but {socket} cannot be reached: {message} (mount it read-only: -v /var/run/docker.sock:/var/run/docker.sock:ro; for MODE=swarm set SHOAL_SERVICE to the service's name instead, as the stack does with {{{{.Service.Name}}}}; or use MODE=static with --peer)"
    )]
    NoDocker {
        mode: Mode,
        socket: String,
        message: String,
    },
    #[error("MODE={mode}: cannot find this container through the Docker API ({id}): {message}")]
    SelfNotFound {
        mode: Mode,
        id: String,
        message: String,
    },
    #[error(
        "MODE={0}: not running in a Docker container (no container id in /proc/self/mountinfo); use MODE=static with --peer"
    )]
    NotInContainer(Mode),
    #[error(
        "MODE=swarm: this container has no {SERVICE_LABEL} label, so it is not a Swarm task (deploy it with `docker stack deploy`, or use MODE=docker)"
    )]
    NotSwarmTask,
    #[error(
        "MODE=docker: this container has no {CLUSTER_LABEL} label: start it with --label {CLUSTER_LABEL}=NAME (the same NAME on every member)"
    )]
    NoClusterLabel,
    #[error("cannot set up DNS resolution for tasks.{service}: {message}")]
    Resolver { service: String, message: String },
}

/// The peer list of `MODE=static`: `HOST:PORT` targets, checked for form when built
/// and resolved while the daemon runs.
#[derive(Clone, Debug, Default)]
pub struct StaticPeers {
    targets: Vec<String>,
    /// This node's own listening address, never its own peer.
    own: Option<SocketAddr>,
}

impl StaticPeers {
    /// Checks that each target is `HOST:PORT`; resolving waits for [`Discovery::run`].
    pub fn new(targets: &[String], own: SocketAddr) -> Result<Self, DiscoveryError> {
        for target in targets {
            let port = target
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(_))) if !host.is_empty()) {
                return Err(DiscoveryError::PeerFormat(target.clone()));
            }
        }
        Ok(StaticPeers {
            targets: targets.to_vec(),
            own: Some(own),
        })
    }

    /// Resolves every target; one that fails keeps its address in `known` (a name
    /// that stops resolving for a moment is not a peer leaving). Returns the peer set
    /// and the targets that failed, with why.
    async fn resolve(
        &self,
        known: &mut BTreeMap<String, SocketAddr>,
    ) -> (BTreeSet<SocketAddr>, Vec<(String, String)>) {
        let mut failed = Vec::new();
        for target in &self.targets {
            let lookup =
                tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(target.as_str()));
            let found = match lookup.await {
                Ok(Ok(mut addrs)) => addrs.next().ok_or_else(|| "no address".to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs())),
            };
            match found {
                Ok(addr) => {
                    if known
                        .insert(target.clone(), addr)
                        .is_some_and(|old| old != addr)
                    {
                        tracing::info!("peer {target} now resolves to {addr}");
                    }
                }
                Err(why) => failed.push((target.clone(), why)),
            }
        }
        let set = known
            .values()
            .copied()
            .filter(|a| Some(*a) != self.own)
            .collect();
        (set, failed)
    }

    /// Publishes the resolved peers on `peers` until `stop` flips: every `heartbeat`,
    /// and sooner (with backoff) while some name does not resolve.
    async fn follow(
        &self,
        peers: watch::Sender<BTreeSet<SocketAddr>>,
        heartbeat: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut known = BTreeMap::new();
        let mut said: HashSet<String> = HashSet::new();
        let mut retry = RESOLVE_FIRST_RETRY;
        loop {
            let (set, failed) = self.resolve(&mut known).await;
            for (target, why) in &failed {
                if said.insert(target.clone()) && !known.contains_key(target) {
                    tracing::warn!(
                        "peer {target} does not resolve yet ({why}); retrying with backoff up to every {} (in compose, another service's name resolves only once its container runs)",
                        humantime::format_duration(heartbeat)
                    );
                }
            }
            for target in known.keys() {
                if said.remove(target) {
                    tracing::info!("peer {target} resolves to {}", known[target]);
                }
            }
            peers.send_if_modified(|current| {
                let changed = *current != set;
                *current = set;
                changed
            });
            let wait = match failed.is_empty() {
                true => heartbeat,
                false => {
                    let wait = retry.min(heartbeat);
                    retry = (retry * 2).min(heartbeat);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Finds peers in one [`Mode`]; built (and checked) before the daemon serves.
pub struct Discovery {
    source: Source,
    port: u16,
    heartbeat: Duration,
}

enum Source {
    Static(StaticPeers),
    Docker {
        docker: Docker,
        me: String,
        cluster: String,
    },
    Swarm {
        /// The Docker API and this container's id, if the socket is mounted.
        docker: Option<(Docker, String)>,
        service: String,
        resolver: Box<TokioResolver>,
    },
}

impl Discovery {
    /// Sets up discovery in `mode`: `static_peers` for `static`; `service` (from the
    /// stack's templating) for `swarm`, with the Docker API on `socket` if it can be
    /// reached; otherwise connects to the Docker API and finds this container (and its
    /// service or cluster label). Every way this can fail is a clear error here, before
    /// serving. Peers are expected to listen on `port`, as this node does.
    pub async fn new(
        mode: Mode,
        static_peers: StaticPeers,
        (socket, service): (&str, Option<&str>),
        port: u16,
        heartbeat: Duration,
    ) -> Result<Self, DiscoveryError> {
        if mode == Mode::Static {
            return Ok(Discovery {
                source: Source::Static(static_peers),
                port,
                heartbeat,
            });
        }
        if let (Mode::Swarm, Some(service)) = (mode, service.filter(|s| !s.is_empty())) {
            let docker = match Self::own_container(mode, socket).await {
                Ok((docker, me, _)) => Some((docker, me)),
                Err(e) => {
                    tracing::info!(
                        "peers from tasks.{service} DNS only, every {} s (without the Docker socket: {e})",
                        DNS_POLL.as_secs()
                    );
                    None
                }
            };
            return Ok(Discovery {
                source: Source::Swarm {
                    docker,
                    resolver: Box::new(tasks_resolver(service)?),
                    service: service.to_string(),
                },
                port,
                heartbeat,
            });
        }
        let (docker, me, labels) = Self::own_container(mode, socket).await?;
        let source = match mode {
            // (static returned above)
            Mode::Static | Mode::Docker => Source::Docker {
                cluster: labels
                    .get(CLUSTER_LABEL)
                    .cloned()
                    .ok_or(DiscoveryError::NoClusterLabel)?,
                docker,
                me,
            },
            Mode::Swarm => {
                let service = labels
                    .get(SERVICE_LABEL)
                    .cloned()
                    .ok_or(DiscoveryError::NotSwarmTask)?;
                Source::Swarm {
                    docker: Some((docker, me)),
                    resolver: Box::new(tasks_resolver(&service)?),
                    service,
                }
            }
        };
        Ok(Discovery {
            source,
            port,
            heartbeat,
        })
    }

    /// The Docker API on `socket`, this container's id and its labels.
    async fn own_container(
        mode: Mode,
        socket: &str,
    ) -> Result<(Docker, String, HashMap<String, String>), DiscoveryError> {
        let no_docker = |message: String| DiscoveryError::NoDocker {
            mode,
            socket: socket.to_string(),
            message,
        };
        let docker =
            Docker::connect_with_unix(socket, DOCKER_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|e| no_docker(e.to_string()))?
                .negotiate_version()
                .await
                .map_err(|e| no_docker(e.to_string()))?;
        let me =
            crate::container::own_container_id().ok_or(DiscoveryError::NotInContainer(mode))?;
        let labels = docker
            .inspect_container(&me, None::<InspectContainerOptions>)
            .await
            .map_err(|e| DiscoveryError::SelfNotFound {
                mode,
                id: me.clone(),
                message: e.to_string(),
            })?
            .config
            .and_then(|c| c.labels)
            .unwrap_or_default();
        Ok((docker, me, labels))
    }

    /// What this discovery follows, for the log.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Static(peers) => format!("static peer list ({} peers)", peers.targets.len()),
            Source::Docker { cluster, .. } => format!(
                "containers labelled {CLUSTER_LABEL}={cluster} on this container's networks"
            ),
            Source::Swarm { service, .. } => format!("the tasks of service {service}"),
        }
    }

    /// Publishes the peer set on `peers` until `stop` flips.
    pub async fn run(
        self,
        peers: watch::Sender<BTreeSet<SocketAddr>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let docker = match &self.source {
            Source::Static(list) => {
                list.follow(peers, self.heartbeat, stop).await;
                return;
            }
            Source::Docker { docker, .. } => Some(docker.clone()),
            Source::Swarm { docker, .. } => docker.as_ref().map(|(docker, _)| docker.clone()),
        };
        let period = match &self.source {
            Source::Swarm { .. } => self.heartbeat.min(DNS_POLL),
            _ => self.heartbeat,
        };
        // Events only say "look again": they are forwarded as wake-ups.
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let events = docker.map(|docker| tokio::spawn(follow_events(docker, wake.clone())));
        let mut last_error = String::new();
        loop {
            match self.look().await {
                Ok(set) => {
                    last_error.clear();
                    peers.send_if_modified(|current| {
                        if *current == set {
                            return false;
                        }
                        let list: Vec<String> = set.iter().map(|a| a.to_string()).collect();
                        tracing::info!(peers = %list.join(" "), "discovered peers");
                        *current = set;
                        true
                    });
                }
                Err(message) => {
                    // A failed look keeps the last known peers: a Docker daemon restart
                    // must not make every peer "leave".
                    if message != last_error {
                        tracing::warn!(
                            "peer discovery failed (keeping the known peers): {message}"
                        );
                        last_error = message;
                    }
                }
            }
            let woken = tokio::select! {
                _ = tokio::time::sleep(period) => false,
                _ = wake.notified() => true,
                _ = stop.wait_for(|s| *s) => break,
            };
            if woken {
                tokio::time::sleep(EVENT_SETTLE).await;
            }
        }
        if let Some(events) = events {
            events.abort();
        }
    }

    /// One look at the current peers.
    pub async fn look(&self) -> Result<BTreeSet<SocketAddr>, String> {
        match &self.source {
            Source::Static(list) => Ok(list.resolve(&mut BTreeMap::new()).await.0),
            Source::Docker {
                docker,
                me,
                cluster,
            } => {
                let (own_ips, own_networks) = own_endpoints(docker, me).await?;
                let filters = HashMap::from([
                    ("label", vec![format!("{CLUSTER_LABEL}={cluster}")]),
                    ("status", vec!["running".to_string()]),
                ]);
                let containers = docker
                    .list_containers(Some(
                        ListContainersOptionsBuilder::new()
                            .filters(&filters)
                            .build(),
                    ))
                    .await
                    .map_err(|e| format!("listing containers: {e}"))?;
                let mut set = BTreeSet::new();
                for container in containers {
                    if container.id.as_deref() == Some(me.as_str()) {
                        continue;
                    }
                    let networks = container
                        .network_settings
                        .and_then(|n| n.networks)
                        .unwrap_or_default();
                    for endpoint in networks.values() {
                        if !endpoint
                            .network_id
                            .as_ref()
                            .is_some_and(|id| own_networks.contains(id))
                        {
                            continue;
                        }
                        if let Some(ip) = endpoint_ip(endpoint)
                            && !own_ips.contains(&ip)
                        {
                            set.insert(SocketAddr::new(ip, self.port));
                        }
                    }
                }
                Ok(set)
            }
            Source::Swarm {
                docker: Some((docker, me)),
                service,
                resolver,
            } => {
                let (own_ips, networks) = own_endpoints(docker, me).await?;
                let (listed, dns) = tokio::join!(
                    network_tasks(docker, &networks, service),
                    resolve_tasks(resolver, service)
                );
                let found: BTreeSet<IpAddr> = match (listed, dns) {
                    (Err(a), Err(b)) => return Err(format!("{a}; {b}")),
                    (Ok(a), Ok(b)) => a.into_iter().chain(b).collect(),
                    (Ok(ips), Err(e)) | (Err(e), Ok(ips)) => {
                        tracing::debug!("one way of finding tasks failed: {e}");
                        ips.into_iter().collect()
                    }
                };
                Ok(found
                    .into_iter()
                    .filter(|ip| !own_ips.contains(ip))
                    .map(|ip| SocketAddr::new(ip, self.port))
                    .collect())
            }
            Source::Swarm {
                docker: None,
                service,
                resolver,
            } => Ok(resolve_tasks(resolver, service)
                .await?
                .into_iter()
                .filter(|ip| !is_own_address(*ip))
                .map(|ip| SocketAddr::new(ip, self.port))
                .collect()),
        }
    }
}

/// Whether `ip` is an address of this host (container): the kernel picks a local
/// address as its own source when asked to reach it.
fn is_own_address(ip: IpAddr) -> bool {
    let any: SocketAddr = match ip {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(any)
        .and_then(|socket| {
            socket.connect((ip, 9))?;
            socket.local_addr()
        })
        .is_ok_and(|local| local.ip() == ip)
}

/// A resolver for `tasks.<service>` through the container's DNS (Docker's embedded one).
fn tasks_resolver(service: &str) -> Result<TokioResolver, DiscoveryError> {
    let resolver_error = |message: String| DiscoveryError::Resolver {
        service: service.to_string(),
        message,
    };
    let mut builder = TokioResolver::builder_tokio().map_err(|e| resolver_error(e.to_string()))?;
    // Docker's DNS answers with long TTLs; a cached answer would hide joins and leaves
    // until it expired.
    builder.options_mut().cache_size = 0;
    // A slow answer must not hold up the next look for long.
    builder.options_mut().timeout = Duration::from_secs(2);
    builder.options_mut().attempts = 1;
    builder.build().map_err(|e| resolver_error(e.to_string()))
}

/// The addresses `tasks.<service>` resolves to through Docker's embedded DNS.
async fn resolve_tasks(resolver: &TokioResolver, service: &str) -> Result<Vec<IpAddr>, String> {
    let name = format!("tasks.{service}.");
    // Stack services are named STACK_SERVICE: `_` is no hostname character, so the name
    // is taken as raw ASCII labels, not as a hostname.
    let query = hickory_resolver::proto::rr::Name::from_ascii(&name)
        .map_err(|e| format!("{name} is no DNS name: {e}"))?;
    match resolver.lookup_ip(query).await {
        Ok(answer) => Ok(answer.iter().collect()),
        // No task has an address yet (or only we do, on another network).
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
        Err(e) => Err(format!("resolving {name}: {e}")),
    }
}

/// The endpoint addresses of `service`'s tasks on the Swarm-scoped networks `networks`,
/// from their verbose inspection (each node's view of the network's gossip; works on
/// workers too).
async fn network_tasks(
    docker: &Docker,
    networks: &HashSet<String>,
    service: &str,
) -> Result<Vec<IpAddr>, String> {
    let mut ips = Vec::new();
    for network in networks {
        let options = InspectNetworkOptionsBuilder::new()
            .verbose(true)
            .scope("swarm")
            .build();
        let inspect = docker
            .inspect_network(network, Some(options))
            .await
            .map_err(|e| format!("inspecting network {network}: {e}"))?;
        if let Some(services) = &inspect.services {
            ips.extend(
                service_task_ips(services, service)
                    .map_err(|e| format!("network {network}: {e}"))?,
            );
        }
    }
    Ok(ips)
}

/// The task endpoint addresses of `service` in a verbose network inspection's
/// `Services` (service name -> `ServiceInfo`).
fn service_task_ips(
    services: &HashMap<String, serde_json::Value>,
    service: &str,
) -> Result<Vec<IpAddr>, String> {
    let Some(info) = services.get(service) else {
        return Ok(Vec::new());
    };
    let info: bollard::models::ServiceInfo = serde_json::from_value(info.clone())
        .map_err(|e| format!("unexpected service entry: {e}"))?;
    Ok(info
        .tasks
        .unwrap_or_default()
        .iter()
        .filter_map(|t| t.endpoint_ip.as_deref()?.parse::<IpAddr>().ok())
        .collect())
}

fn endpoint_ip(endpoint: &bollard::models::EndpointSettings) -> Option<IpAddr> {
    endpoint
        .ip_address
        .as_deref()
        .filter(|ip| !ip.is_empty())
        .and_then(|ip| ip.parse().ok())
}

/// This container's addresses, and the ids of its user-defined networks (the default
/// bridge has no name resolution and mixes unrelated containers: never used).
async fn own_endpoints(
    docker: &Docker,
    me: &str,
) -> Result<(HashSet<IpAddr>, HashSet<String>), String> {
    let networks = docker
        .inspect_container(me, None::<InspectContainerOptions>)
        .await
        .map_err(|e| format!("inspecting this container: {e}"))?
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default();
    let ips = networks.values().filter_map(endpoint_ip).collect();
    let ids = networks
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "bridge" | "host" | "none"))
        .filter_map(|(_, endpoint)| endpoint.network_id.clone())
        .collect();
    Ok((ips, ids))
}

/// Wakes `wake` on every container or network event of the local engine; reconnects
/// (with backoff) if the stream ends.
async fn follow_events(docker: Docker, wake: std::sync::Arc<tokio::sync::Notify>) {
    let filters = HashMap::from([("type", vec!["container", "network"])]);
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut events = docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => {
                    backoff = Duration::from_secs(1);
                    wake.notify_one();
                }
                Err(e) => {
                    tracing::debug!("Docker events: {e}");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
        // Whatever happened while we were not listening is found by this look.
        wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As `docker network inspect --verbose` shows an overlay network's services.
    #[test]
    fn task_endpoints_are_read_from_a_verbose_network_inspection() {
        let services: HashMap<String, serde_json::Value> = serde_json::from_str(
            r#"{"st_shoal":{"VIP":"10.0.2.2","Ports":[],"LocalLBIndex":264,"Tasks":[
              {"Name":"st_shoal.1.mc","EndpointID":"1270","EndpointIP":"10.0.2.3","Info":{"Host IP":"127.0.0.1"}},
              {"Name":"st_shoal.2.te","EndpointID":"81e0","EndpointIP":"10.0.2.4","Info":{"Host IP":"127.0.0.1"}}]}}"#,
        )
        .unwrap();
        let ips = service_task_ips(&services, "st_shoal").unwrap();
        assert_eq!(
            ips,
            [
                "10.0.2.3".parse::<IpAddr>().unwrap(),
                "10.0.2.4".parse().unwrap()
            ]
        );
        assert!(service_task_ips(&services, "other").unwrap().is_empty());
        let garbled = HashMap::from([("st_shoal".to_string(), serde_json::json!({"Tasks": 5}))]);
        assert!(service_task_ips(&garbled, "st_shoal").is_err());
    }

    #[test]
    fn this_hosts_own_addresses_are_recognised() {
        assert!(is_own_address("127.0.0.1".parse().unwrap()));
        // TEST-NET-1: never an address of this host.
        assert!(!is_own_address("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn modes_parse_and_unknown_ones_are_named() {
        assert_eq!("swarm".parse::<Mode>().unwrap(), Mode::Swarm);
        assert_eq!(" Docker ".parse::<Mode>().unwrap(), Mode::Docker);
        assert_eq!("static".parse::<Mode>().unwrap(), Mode::Static);
        let e = "compose".parse::<Mode>().unwrap_err().to_string();
        assert!(
            e.contains("\"compose\"") && e.contains("swarm, docker or static"),
            "{e}"
        );
    }
}
