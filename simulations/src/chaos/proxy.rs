//! A UDP fault proxy between one agent and the coordinator: the agent dials the proxy, the
//! proxy forwards every datagram both ways, and the harness tells it to drop everything (a
//! partition), to drop a share of the datagrams, or to delay them. No privileges needed: it
//! is a plain pair of sockets per client address and a thread per direction.

use rand::Rng;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to datagrams now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Drop every datagram, both ways.
    pub partitioned: bool,
    /// Share of datagrams dropped (0 to 1), each way.
    pub loss: f64,
    /// Added one-way delay.
    pub delay: Duration,
}

/// A datagram waiting for its delay.
struct Delayed {
    at: Instant,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at) // earliest first in the max-heap
    }
}

/// The proxy: forwards until dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy on a free loopback port in front of `upstream`.
    pub fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listen = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        listen.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = listen.local_addr()?;
        let faults = Arc::new(Mutex::new(Faults::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (delay_tx, delay_rx) = mpsc::channel::<Delayed>();
        let delayer = {
            let stop = stop.clone();
            std::thread::spawn(move || delayer(delay_rx, stop))
        };
        let forward = {
            let (faults, stop, listen) = (faults.clone(), stop.clone(), listen.clone());
            std::thread::spawn(move || {
                let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                let mut back_threads = vec![];
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = listen.recv_from(&mut buf) else { continue };
                    let up = match upstreams.get(&from) {
                        Some(u) => u.clone(),
                        None => {
                            let Ok(u) = UdpSocket::bind("127.0.0.1:0") else { continue };
                            let u = Arc::new(u);
                            let _ = u.set_read_timeout(Some(Duration::from_millis(100)));
                            upstreams.insert(from, u.clone());
                            let (faults, stop, listen, delay_tx, u2) =
                                (faults.clone(), stop.clone(), listen.clone(), delay_tx.clone(), u.clone());
                            back_threads.push(std::thread::spawn(move || {
                                let mut buf = vec![0u8; 65_536];
                                while !stop.load(Ordering::Relaxed) {
                                    let Ok((n, _)) = u2.recv_from(&mut buf) else { continue };
                                    pass(&faults, &delay_tx, &listen, from, &buf[..n]);
                                }
                            }));
                            u
                        }
                    };
                    pass(&faults, &delay_tx, &up, upstream, &buf[..n]);
                }
                for t in back_threads {
                    let _ = t.join();
                }
            })
        };
        Ok(Proxy { addr, faults, stop, threads: vec![forward, delayer] })
    }

    /// Sets what happens to datagrams from now on.
    pub fn set(&self, f: Faults) {
        if let Ok(mut g) = self.faults.lock() {
            *g = f;
        }
    }
}

/// Sends, drops or delays one datagram as the faults say.
fn pass(
    faults: &Mutex<Faults>,
    delay_tx: &mpsc::Sender<Delayed>,
    socket: &Arc<UdpSocket>,
    to: SocketAddr,
    bytes: &[u8],
) {
    let f = faults.lock().map(|g| *g).unwrap_or_default();
    if f.partitioned || (f.loss > 0.0 && rand::thread_rng().gen_bool(f.loss.clamp(0.0, 1.0))) {
        return;
    }
    if f.delay.is_zero() {
        let _ = socket.send_to(bytes, to);
    } else {
        let _ =
            delay_tx.send(Delayed { at: Instant::now() + f.delay, socket: socket.clone(), to, bytes: bytes.to_vec() });
    }
}

/// Releases delayed datagrams when they are due.
fn delayer(rx: mpsc::Receiver<Delayed>, stop: Arc<AtomicBool>) {
    let mut heap: BinaryHeap<Delayed> = BinaryHeap::new();
    while !stop.load(Ordering::Relaxed) {
        let wait = heap.peek().map_or(Duration::from_millis(100), |d| d.at.saturating_duration_since(Instant::now()));
        match rx.recv_timeout(wait) {
            Ok(d) => heap.push(d),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        while heap.peek().is_some_and(|d| d.at <= Instant::now()) {
            if let Some(d) = heap.pop() {
                let _ = d.socket.send_to(&d.bytes, d.to);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> (SocketAddr, std::thread::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let addr = s.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        });
        (addr, t)
    }

    #[test]
    fn forwards_both_ways_and_partitions_and_delays_on_command() {
        let (server, _t) = echo_server();
        let proxy = Proxy::start(server).unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut buf = [0u8; 64];
        c.send_to(b"ping", proxy.addr).unwrap();
        let (n, from) = c.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"ping"[..], proxy.addr));

        proxy.set(Faults { partitioned: true, ..Faults::default() });
        c.send_to(b"lost", proxy.addr).unwrap();
        assert!(c.recv_from(&mut buf).is_err(), "a partition drops everything");

        proxy.set(Faults { delay: Duration::from_millis(150), ..Faults::default() });
        let t = Instant::now();
        c.send_to(b"slow", proxy.addr).unwrap();
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"slow");
        assert!(t.elapsed() >= Duration::from_millis(300), "delayed each way: {:?}", t.elapsed());
    }
}
