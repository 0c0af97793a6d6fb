//! The coordinator's side of the items worker: starts the child (`x-items` of this same
//! executable), sends it the request with its limits, serves the blocks it asks for (only
//! blocks of the one disk, read from the store one at a time), forwards what it answers, and
//! kills it when it overruns its wall-clock budget, goes silent, or the caller goes away
//! (cancel). At most [`MAX_WORKERS`] run at once; the rest wait their turn.

use super::disk::{BlockSource, StoreBlocks};
use super::pipe::{self, Op, Reply, Request};
use super::ItemsError;
use bulwark_protocol::codec;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{mpsc, Semaphore};

/// Workers running at once, whatever the number of requests.
pub const MAX_WORKERS: usize = 4;

static PERMITS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(MAX_WORKERS));
static COMMAND: OnceLock<(PathBuf, Vec<OsString>)> = OnceLock::new();

/// How the worker is started when this executable is a multi-call launcher (`bulwark
/// x-coordinator …`): the executable and the arguments before `x-items`. Without a call, the
/// current executable with no prefix (`bulwark-coordinator x-items`).
pub fn set_worker_command(exe: PathBuf, prefix: Vec<OsString>) {
    let _ = COMMAND.set((exe, prefix));
}

fn worker_command() -> Result<(PathBuf, Vec<OsString>), ItemsError> {
    if let Some(c) = COMMAND.get() {
        return Ok(c.clone());
    }
    let exe = std::env::current_exe().map_err(|e| ItemsError::Worker(format!("cannot find this executable: {e}")))?;
    Ok((exe, vec![]))
}

/// What a worker may spend.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Wall-clock time for the whole request (not counting time the caller takes to consume
    /// answers).
    pub total: Option<Duration>,
    /// Longest silence from the worker.
    pub idle: Duration,
    pub cpu_secs: u64,
    pub memory_bytes: u64,
}

impl Budget {
    /// Browsing and the swap scan: answered within 10 s all told.
    pub const BROWSE: Budget = Budget {
        total: Some(Duration::from_secs(8)),
        idle: Duration::from_secs(8),
        cpu_secs: 8,
        memory_bytes: 1 << 30,
    };
    /// Copying items out: as long as it makes progress.
    pub const COPY: Budget =
        Budget { total: None, idle: Duration::from_secs(60), cpu_secs: 24 * 3600, memory_bytes: 1 << 30 };
}

/// What the worker sent.
#[derive(Debug)]
pub enum Out {
    Reply(Reply),
    Data(Vec<u8>),
}

/// A running request. Dropping it kills the worker.
pub struct Session {
    rx: mpsc::Receiver<Out>,
    task: Option<tokio::task::JoinHandle<Result<(), ItemsError>>>,
}

impl Session {
    /// The next answer; `None` once the worker is done (then [`Session::finish`] says how).
    pub async fn next(&mut self) -> Option<Out> {
        self.rx.recv().await
    }

    /// How the request ended.
    pub async fn finish(mut self) -> Result<(), ItemsError> {
        self.rx.close();
        let Some(task) = self.task.take() else { return Ok(()) };
        match task.await {
            Ok(r) => r,
            Err(e) => Err(ItemsError::Worker(format!("the worker's supervisor stopped: {e}"))),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Aborting the supervisor drops the child, which kills it (kill_on_drop).
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts a worker on `op` over the disk `source` reads.
pub fn start(source: StoreBlocks, op: Op, budget: Budget) -> Session {
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::spawn(supervise(source, op, budget, tx));
    Session { rx, task: Some(task) }
}

/// A string from a guest or the worker, safe for a log line or a terminal: control characters
/// escaped, at most 300 characters.
pub fn printable(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().take(300) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

async fn supervise(source: StoreBlocks, op: Op, budget: Budget, tx: mpsc::Sender<Out>) -> Result<(), ItemsError> {
    let _permit = PERMITS.acquire().await.map_err(|e| ItemsError::Worker(e.to_string()))?;
    let geometry = source.geometry();
    let source = Arc::new(Mutex::new(source));
    let (exe, prefix) = worker_command()?;
    let mut child = tokio::process::Command::new(&exe)
        .args(&prefix)
        .arg("x-items")
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ItemsError::Worker(format!("cannot start the items worker {}: {e}", exe.display())))?;
    let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(ItemsError::Worker("the items worker has no pipes".into()));
    };
    // The first 4 KiB of what the worker says on stderr (an allocation failure, a panic).
    let stderr_task = tokio::spawn(async move {
        let mut head = Vec::new();
        let _ = stderr.take(4096).read_to_end(&mut head).await;
        String::from_utf8_lossy(&head).into_owned()
    });
    let req = Request { geometry, op, memory_bytes: budget.memory_bytes, cpu_secs: budget.cpu_secs };
    let body = codec::encode(&req).map_err(|e| ItemsError::Worker(e.to_string()))?;
    let started = Instant::now();
    let fail = |why: String| ItemsError::Worker(why);
    pipe::write_frame_async(&mut stdin, pipe::REQUEST, &body)
        .await
        .map_err(|e| fail(format!("cannot brief the worker: {e}")))?;
    let blocks = geometry.blocks();
    let mut waited = Duration::ZERO;
    loop {
        let mut wait = budget.idle;
        if let Some(total) = budget.total {
            let left = total.saturating_sub(started.elapsed().saturating_sub(waited));
            wait = wait.min(left);
        }
        let frame = match tokio::time::timeout(wait, pipe::read_frame_async(&mut stdout)).await {
            Ok(f) => f,
            Err(_) => {
                let _ = child.start_kill();
                let secs = budget.total.map_or(budget.idle, |t| t.min(budget.idle)).as_secs();
                return Err(fail(format!("the reader did not finish within {secs}s and was stopped")));
            }
        };
        match frame {
            Ok(Some((pipe::READ_BLOCK, body))) => {
                let index = <[u8; 8]>::try_from(body.as_slice())
                    .map(u64::from_le_bytes)
                    .map_err(|_| fail("the worker sent a malformed block request".into()))?;
                let answer = if index >= blocks {
                    Err(format!("block {index} is outside the disk"))
                } else {
                    let s = source.clone();
                    tokio::task::spawn_blocking(move || match s.lock() {
                        Ok(mut s) => s.read_block(index).map_err(|e| e.to_string()),
                        Err(_) => Err("the block source is poisoned".to_owned()),
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                };
                let (kind, body) = match answer {
                    Ok(data) => (pipe::BLOCK, data),
                    Err(why) => (pipe::BLOCK_ERROR, why.into_bytes()),
                };
                pipe::write_frame_async(&mut stdin, kind, &body)
                    .await
                    .map_err(|e| fail(format!("the worker went away: {e}")))?;
            }
            Ok(Some((pipe::REPLY, body))) => {
                let reply: Reply =
                    codec::decode(&body).map_err(|e| fail(format!("the worker sent a bad answer: {e}")))?;
                match reply {
                    Reply::Done => break,
                    Reply::Failed(e) => {
                        let _ = child.start_kill();
                        return Err(e);
                    }
                    other => {
                        let t = Instant::now();
                        if tx.send(Out::Reply(other)).await.is_err() {
                            return Ok(());
                        }
                        waited += t.elapsed();
                    }
                }
            }
            Ok(Some((pipe::DATA, body))) => {
                let t = Instant::now();
                if tx.send(Out::Data(body)).await.is_err() {
                    return Ok(());
                }
                waited += t.elapsed();
            }
            Ok(Some((kind, _))) => return Err(fail(format!("the worker sent an unknown frame ({kind})"))),
            Ok(None) | Err(_) => {
                let status = child.wait().await.ok();
                let said = stderr_task.await.unwrap_or_default();
                return Err(fail(died(status, &said)));
            }
        }
    }
    drop(stdin);
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            let _ = child.start_kill();
        }
    }
    Ok(())
}

/// Why a worker stopped without answering, in an operator's words.
fn died(status: Option<std::process::ExitStatus>, stderr: &str) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    let said = stderr.lines().find(|l| !l.trim().is_empty()).map(printable);
    let memory = stderr.contains("memory allocation") || stderr.contains("capacity overflow");
    let why = match status.and_then(|s| s.signal()) {
        _ if memory => "it needed more memory than its limit allows".to_owned(),
        Some(s) if s == libc::SIGXCPU || s == libc::SIGKILL => "it used up its CPU time or was killed".to_owned(),
        Some(s) => format!("it stopped on signal {s}"),
        None => match status.and_then(|s| s.code()) {
            Some(c) => format!("it exited with status {c}"),
            None => "it stopped".to_owned(),
        },
    };
    match said {
        Some(s) if !memory => format!("the reader stopped: {why} ({s})"),
        _ => format!("the reader stopped: {why}"),
    }
}
