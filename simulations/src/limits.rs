//! The machine's limits, measured in the same run as everything they are compared with:
//! - **read**: sequential 1 MiB reads of a file from the device (`O_DIRECT`, cache bypassed),
//!   and through the warm page cache for reference,
//! - **BLAKE3**: hashing 1 MiB blocks, on one thread and on every core,
//! - **QUIC**: bytes/s through real QUIC with mutual TLS on loopback, using the product's own
//!   certificates, TLS configs and transport settings, with 1 and with 4 streams.

use bulwark_pki::ca::{LeafSpec, SERVICE_VALIDITY};
use bulwark_pki::{quic, tls, Ca, Role};
use rand::{RngCore, SeedableRng};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

const BLOCK: usize = 1 << 20;

/// Bytes per second of `bytes` in `elapsed`.
pub fn rate(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Writes `size` bytes of seeded random data to `path` (fsynced) and returns how long it took.
pub fn write_random_file(path: &Path, size: u64, seed: u64) -> std::io::Result<Duration> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; BLOCK];
    let start = Instant::now();
    let mut left = size;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(start.elapsed())
}

/// Sequential read throughput of `path` in bytes/s from the device, bypassing the page cache
/// (`O_DIRECT`). `Ok(None)` where the file system does not support direct I/O (tmpfs).
pub fn direct_read_bps(path: &Path) -> std::io::Result<Option<f64>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Direct I/O wants a page-aligned buffer: take an aligned window of a larger allocation.
    let mut raw = vec![0u8; BLOCK + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[off..off + BLOCK];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = match f.read(buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(Some(rate(total, start.elapsed())))
}

/// Drops the page cache (needs root), so the next read comes from the device; false when it
/// cannot. Dirty pages are written back first.
pub fn drop_caches() -> bool {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "1\n").is_ok()
}

/// Sequential write throughput in bytes/s of `size` bytes (1 MiB writes of incompressible
/// data, then fsync): what a store's pack writes cannot beat.
pub fn write_bps(path: &Path, size: u64) -> std::io::Result<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut buf = vec![0u8; BLOCK];
    rng.fill_bytes(&mut buf);
    let mut f = std::fs::File::create(path)?;
    let start = Instant::now();
    let mut left = size;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        // A different first word per block, so nothing below could deduplicate or compress.
        buf[..8].copy_from_slice(&left.to_le_bytes());
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    let r = rate(size, start.elapsed());
    drop(f);
    std::fs::remove_file(path)?;
    Ok(r)
}

/// Sequential read throughput of `path` in bytes/s through the page cache.
pub fn read_bps(path: &Path) -> std::io::Result<f64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; BLOCK];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(rate(total, start.elapsed()))
}

/// BLAKE3 throughput over `path`'s 1 MiB blocks with `threads` hashing threads.
pub fn blake3_bps(path: &Path, threads: usize) -> std::io::Result<f64> {
    let data = std::fs::read(path)?;
    let threads = threads.max(1);
    let blocks: Vec<&[u8]> = data.chunks(BLOCK).collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let blocks = &blocks;
            s.spawn(move || {
                let mut acc = 0u8;
                for b in blocks.iter().skip(t).step_by(threads) {
                    acc ^= blake3::hash(b).as_bytes()[0];
                }
                std::hint::black_box(acc);
            });
        }
    });
    Ok(rate(data.len() as u64, start.elapsed()))
}

/// Raw QUIC + mTLS throughput on loopback: `total` bytes split over `streams` unidirectional
/// streams, server and client each on their own thread and runtime.
pub fn quic_bps(total: u64, streams: usize) -> anyhow::Result<f64> {
    let ca = Ca::generate("bench")?;
    let (server_cert, server_key) =
        ca.issue_with_new_key(&LeafSpec::new(Role::Coordinator, "bench", vec!["bench".into()], SERVICE_VALIDITY))?;
    let (client_cert, client_key) =
        ca.issue_with_new_key(&LeafSpec::new(Role::Agent, "node", vec!["node".into()], SERVICE_VALIDITY))?;
    let crl = tls::crl_from_pem(&ca.crl(&[], 1)?)?;
    let server_tls = tls::server_config(
        ca.cert_der(),
        vec![server_cert.der.clone(), ca.cert_der().clone()],
        tls::key_from_pem(&server_key.serialize_pem(), "key")?,
        crl,
        &[bulwark_protocol::ALPN],
    )?;
    let client_tls = tls::client_config(
        ca.cert_der(),
        vec![client_cert.der.clone()],
        tls::key_from_pem(&client_key.serialize_pem(), "key")?,
        bulwark_protocol::ALPN,
    )?;
    let server_cfg = quic::server(server_tls)?;
    let client_cfg = quic::client(client_tls)?;

    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || -> anyhow::Result<u64> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let ep = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse()?)?;
            addr_tx.send(ep.local_addr()?)?;
            let conn = ep.accept().await.ok_or_else(|| anyhow::anyhow!("no connection"))?.await?;
            let mut tasks = vec![];
            for _ in 0..streams {
                let mut recv = conn.accept_uni().await?;
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    let mut buf = vec![0u8; 256 << 10];
                    while let Ok(Some(k)) = recv.read(&mut buf).await {
                        n += k as u64;
                    }
                    n
                }));
            }
            let mut got = 0;
            for t in tasks {
                got += t.await?;
            }
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
            Ok(got)
        })
    });
    let addr = addr_rx.recv()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let elapsed = rt.block_on(async move {
        let mut ep = quinn::Endpoint::client(quic::client_bind_addr(addr))?;
        ep.set_default_client_config(client_cfg);
        let conn = ep.connect(addr, "bench")?.await?;
        let per_stream = total / streams as u64;
        let start = Instant::now();
        let mut tasks = vec![];
        for _ in 0..streams {
            let mut send = conn.open_uni().await?;
            tasks.push(tokio::spawn(async move {
                let buf = vec![0x5au8; BLOCK];
                let mut left = per_stream;
                while left > 0 {
                    let n = left.min(BLOCK as u64) as usize;
                    send.write_all(&buf[..n]).await?;
                    left -= n as u64;
                }
                send.finish()?;
                send.stopped().await?;
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        conn.closed().await;
        let elapsed = start.elapsed();
        ep.wait_idle().await;
        Ok::<_, anyhow::Error>(elapsed)
    })?;
    let got = server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    anyhow::ensure!(got == (total / streams as u64) * streams as u64, "server got {got} bytes");
    Ok(rate(got, elapsed))
}

/// Total memory of the machine, from /proc/meminfo.
pub fn mem_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
        })
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Number of cores available.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
