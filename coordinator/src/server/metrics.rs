//! The opt-in Prometheus endpoint (`[metrics] listen` in `coordinator.toml`): `GET /metrics`
//! answers the OpenMetrics text format, built at scrape time from the catalog and the
//! registry, so the figures are the same ones `bulwark status` and `job list` show and survive
//! restarts (job records are never deleted, so the job counters only grow).
//!
//! The HTTP side is deliberately tiny, and unauthenticated peers cannot make it hold more than
//! a bounded share of the coordinator: at most [`MAX_CONNECTIONS`] connections at once (one
//! more is closed at once), the request head bounded to 8 KiB and [`IDLE_TIMEOUT`], one request
//! per connection, nothing but `GET /metrics` (and `GET /` pointing to it). The text is built
//! at most once per [`CACHE_FOR`], however many scrapes arrive. Accepting pauses while the
//! process's descriptors come within the reserve of [`fds::FdBudget`], so nothing here can
//! make a commit fail for want of a file descriptor.

use crate::server::fds::{self, FdBudget};
use crate::server::registry::ListConnected;
use crate::server::{blocking, State};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

const MAX_HEAD: usize = 8 << 10;
/// Connections served at once; the next one is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that has not sent its whole request head by then is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole request, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes within this long of a build get the same text.
pub const CACHE_FOR: Duration = Duration::from_secs(1);
/// How long accepting pauses when descriptors run short before it looks again.
const FD_PAUSE: Duration = Duration::from_millis(200);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// What a scrape reports, gathered from the catalog on a blocking thread.
#[derive(Debug, Default)]
struct Snapshot {
    /// (kind, state) → job records.
    jobs: Vec<((String, String), u64)>,
    /// kind → bytes transferred / scanned by finished jobs.
    transferred: Vec<(String, u64)>,
    scanned: Vec<(String, u64)>,
    replicas: Vec<(String, u64)>,
    vms: u64,
    vms_protected: u64,
    recovery_points: u64,
    /// Verdicts of restore verification: read back whole, failed, booted, failed to boot.
    verified: [u64; 4],
    agents_enrolled: u64,
    store_bytes: u64,
    catalog_bytes: u64,
}

fn gather(state: &State) -> Result<Snapshot, String> {
    use std::collections::BTreeMap;
    let catalog = state.store.catalog();
    let mut jobs: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut transferred: BTreeMap<String, u64> = BTreeMap::new();
    let mut scanned: BTreeMap<String, u64> = BTreeMap::new();
    for r in catalog.jobs_after(None) {
        let (_, j) = r.map_err(|e| e.to_string())?;
        let kind = j.kind.as_str().to_owned();
        *jobs.entry((kind.clone(), j.state.as_str().to_owned())).or_default() += 1;
        if j.state.is_final() {
            *transferred.entry(kind.clone()).or_default() += j.bytes_transferred;
            *scanned.entry(kind).or_default() += j.bytes_scanned;
        }
    }
    let mut replicas: BTreeMap<String, u64> =
        ["creating", "consistent", "inconsistent"].iter().map(|s| ((*s).to_owned(), 0)).collect();
    for r in catalog.replicas().map_err(|e| e.to_string())? {
        *replicas.entry(r.state.as_str().to_owned()).or_default() += 1;
    }
    let authority = state.authority.catalog();
    Ok(Snapshot {
        jobs: jobs.into_iter().collect(),
        transferred: transferred.into_iter().collect(),
        scanned: scanned.into_iter().collect(),
        replicas: replicas.into_iter().collect(),
        vms: catalog.count_vms(|_| true).map_err(|e| e.to_string())? as u64,
        vms_protected: catalog.count_vms(|v| v.group.is_some()).map_err(|e| e.to_string())? as u64,
        recovery_points: catalog.all_recovery_points().map_err(|e| e.to_string())?.len() as u64,
        verified: catalog.rp_check_counts().map_err(|e| e.to_string())?,
        agents_enrolled: authority.agents().map_err(|e| e.to_string())?.iter().filter(|a| !a.revoked).count() as u64,
        store_bytes: super::admin::dir_size(&state.authority.dir().store()),
        catalog_bytes: catalog.size_on_disk(),
    })
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let g: Gauge = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, g);
}

/// The exposition text of `snap` (and the agents connected now).
fn render(snap: &Snapshot, connected: u64) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("bulwark");
    let jobs = Family::<Labels, Gauge>::default();
    let finished = Family::<Labels, Counter>::default();
    for ((kind, state), n) in &snap.jobs {
        let labels = vec![("kind", kind.clone()), ("state", state.clone())];
        jobs.get_or_create(&labels).set(i64::try_from(*n).unwrap_or(i64::MAX));
        if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
            finished.get_or_create(&vec![("kind", kind.clone()), ("outcome", state.clone())]).inc_by(*n);
        }
    }
    registry.register("jobs", "Jobs the catalog holds, by kind and state (queued and running: now)", jobs);
    registry.register("jobs_finished", "Jobs finished, by kind and outcome", finished);
    let transferred = Family::<Labels, Counter>::default();
    for (kind, n) in &snap.transferred {
        transferred.get_or_create(&vec![("kind", kind.clone())]).inc_by(*n);
    }
    registry.register(
        "transferred_bytes",
        "Bytes moved over the network by finished jobs (backups: received; recoveries: sent)",
        transferred,
    );
    let scanned = Family::<Labels, Counter>::default();
    for (kind, n) in &snap.scanned {
        scanned.get_or_create(&vec![("kind", kind.clone())]).inc_by(*n);
    }
    registry.register("scanned_bytes", "Bytes read on the hosts by finished jobs", scanned);
    let replicas = Family::<Labels, Gauge>::default();
    for (state, n) in &snap.replicas {
        replicas.get_or_create(&vec![("state", state.clone())]).set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    registry.register("replicas", "Disk replicas, by state", replicas);
    gauge(&mut registry, "vms", "VMs reported by the agents", snap.vms);
    gauge(&mut registry, "vms_protected", "VMs in a protection group", snap.vms_protected);
    gauge(&mut registry, "recovery_points", "Recovery points in the catalog", snap.recovery_points);
    let verified = Family::<Labels, Gauge>::default();
    let unverified = snap.recovery_points.saturating_sub(snap.verified[0] + snap.verified[1]);
    let results = [
        ("passed", snap.verified[0]),
        ("failed", snap.verified[1]),
        ("boot_passed", snap.verified[2]),
        ("boot_failed", snap.verified[3]),
        ("unverified", unverified),
    ];
    for (result, n) in results {
        verified.get_or_create(&vec![("result", result.to_owned())]).set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register(
        "recovery_points_verified",
        "Recovery points by the last verdict of restore verification (read back; boot check)",
        verified,
    );
    gauge(&mut registry, "agents_connected", "Agents connected now", connected);
    gauge(&mut registry, "agents_enrolled", "Agents enrolled and not revoked", snap.agents_enrolled);
    gauge(&mut registry, "store_bytes", "Bytes the chunk store takes on disk", snap.store_bytes);
    gauge(&mut registry, "catalog_bytes", "Bytes the catalog takes on disk", snap.catalog_bytes);
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

/// The last exposition text and when it was built.
type Built = Option<(Instant, Arc<str>)>;

/// The cached text if it was built less than [`CACHE_FOR`] before `now`.
fn fresh(built: &Built, now: Instant) -> Option<Arc<str>> {
    built.as_ref().filter(|(at, _)| now.saturating_duration_since(*at) < CACHE_FOR).map(|(_, text)| text.clone())
}

/// Serves the endpoint until the listener fails (it runs for the coordinator's lifetime).
pub async fn serve(state: Arc<State>, listener: TcpListener, budget: FdBudget) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Held across a build, so concurrent scrapes wait for one build instead of each reading
    // the catalog.
    let cache: Arc<tokio::sync::Mutex<Built>> = Arc::default();
    let mut paused = false;
    loop {
        // Descriptors first: while short, connections wait in the kernel's backlog, not in
        // this process's descriptor table.
        if fds::open_count().is_some_and(|open| !budget.admits(open)) {
            if !paused {
                tracing::warn!(
                    limit = budget.limit,
                    reserve = budget.reserve,
                    "metrics endpoint: file descriptors are running short; not accepting until some are free"
                );
                paused = true;
            }
            tokio::time::sleep(FD_PAUSE).await;
            continue;
        }
        if paused {
            tracing::info!("metrics endpoint: accepting again");
            paused = false;
        }
        let (sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint busy: connection closed");
            drop(sock);
            continue;
        };
        let (state, cache) = (state.clone(), cache.clone());
        actix_rt::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(REQUEST_TIMEOUT, handle(&state, &cache, sock)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => tracing::debug!(%peer, "metrics request timed out"),
            }
        });
    }
}

/// Reads the request head; None if the peer closed or stayed idle past [`IDLE_TIMEOUT`].
async fn read_head(sock: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Ok(Some(head));
        }
        let n = match tokio::time::timeout_at(deadline, sock.read(&mut chunk)).await {
            Ok(n) => n?,
            Err(_) => return Ok(None),
        };
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(Some(head))
}

/// The exposition text, from the cache or built now.
async fn scrape(state: &Arc<State>, cache: &tokio::sync::Mutex<Built>) -> Result<Arc<str>, String> {
    let mut built = cache.lock().await;
    if let Some(text) = fresh(&built, Instant::now()) {
        return Ok(text);
    }
    let connected = state.registry.send(ListConnected).await.map(|c| c.len() as u64).unwrap_or(0);
    let st = state.clone();
    let snap = match blocking(move || gather(&st)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) | Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read the catalog");
            return Err(e);
        }
    };
    let text: Arc<str> = render(&snap, connected).map_err(|_| "encoding failed".to_owned())?.into();
    *built = Some((Instant::now(), text.clone()));
    Ok(text)
}

async fn handle(state: &Arc<State>, cache: &tokio::sync::Mutex<Built>, mut sock: TcpStream) -> std::io::Result<()> {
    let Some(head) = read_head(&mut sock).await? else { return Ok(()) };
    if head.len() > MAX_HEAD {
        return respond(&mut sock, "431 Request Header Fields Too Large", "text/plain", "request too large\n").await;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => match scrape(state, cache).await {
            Ok(body) => respond(&mut sock, "200 OK", CONTENT_TYPE, &body).await,
            Err(e) => respond(&mut sock, "500 Internal Server Error", "text/plain", &format!("{e}\n")).await,
        },
        (b"GET", b"/") => respond(&mut sock, "200 OK", "text/plain", "Bulwark coordinator: see /metrics\n").await,
        (b"GET", _) => respond(&mut sock, "404 Not Found", "text/plain", "not found: try /metrics\n").await,
        _ => respond(&mut sock, "405 Method Not Allowed", "text/plain", "only GET\n").await,
    }
}

async fn respond(sock: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_family_with_its_labels() {
        let snap = Snapshot {
            jobs: vec![
                (("sync".into(), "succeeded".into()), 3),
                (("sync".into(), "running".into()), 1),
                (("initial".into(), "failed".into()), 2),
            ],
            transferred: vec![("sync".into(), 4096)],
            scanned: vec![("sync".into(), 8192)],
            replicas: vec![("consistent".into(), 5), ("inconsistent".into(), 1)],
            vms: 7,
            vms_protected: 6,
            recovery_points: 9,
            verified: [5, 1, 2, 1],
            agents_enrolled: 2,
            store_bytes: 123,
            catalog_bytes: 45,
        };
        let text = render(&snap, 2).unwrap();
        for line in [
            r#"bulwark_jobs{kind="sync",state="running"} 1"#,
            r#"bulwark_jobs_finished_total{kind="sync",outcome="succeeded"} 3"#,
            r#"bulwark_jobs_finished_total{kind="initial",outcome="failed"} 2"#,
            r#"bulwark_transferred_bytes_total{kind="sync"} 4096"#,
            r#"bulwark_scanned_bytes_total{kind="sync"} 8192"#,
            r#"bulwark_replicas{state="inconsistent"} 1"#,
            "bulwark_agents_connected 2",
            "bulwark_recovery_points 9",
            r#"bulwark_recovery_points_verified{result="failed"} 1"#,
            r#"bulwark_recovery_points_verified{result="boot_failed"} 1"#,
            r#"bulwark_recovery_points_verified{result="unverified"} 3"#,
            "bulwark_store_bytes 123",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains(r#"outcome="running""#), "running jobs are not finished");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_built_text_is_served_for_a_second_then_rebuilt() {
        let t0 = Instant::now();
        assert!(fresh(&None, t0).is_none(), "nothing built yet");
        let built: Built = Some((t0, Arc::from("text")));
        assert_eq!(fresh(&built, t0).as_deref(), Some("text"));
        assert_eq!(fresh(&built, t0 + CACHE_FOR - Duration::from_millis(1)).as_deref(), Some("text"));
        assert!(fresh(&built, t0 + CACHE_FOR).is_none(), "stale after CACHE_FOR");
        assert_eq!(fresh(&built, t0.checked_sub(Duration::from_secs(5)).unwrap_or(t0)).as_deref(), Some("text"));
    }
}
