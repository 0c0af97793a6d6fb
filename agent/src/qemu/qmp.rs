//! A small QMP client: JSON lines over QEMU's monitor unix socket. It reads the greeting,
//! negotiates capabilities, runs one command at a time with an id and a timeout, and keeps the
//! asynchronous events that arrive meanwhile. Only what the QEMU backend uses; the schema stays
//! `serde_json::Value`, so a newer QEMU's extra fields or enum values never break it.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest line QEMU may send (a `query-named-block-nodes` of a big graph fits easily).
const MAX_LINE: u64 = 32 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Nothing answers on the socket: the VM is off (or the path is wrong).
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("QMP socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("QMP socket {path}: no answer to {command} within {timeout:?}")]
    Timeout { path: PathBuf, command: String, timeout: Duration },
    #[error("QMP socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
    /// QEMU refused the command.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

impl QmpError {
    /// QEMU's error class when QEMU refused the command.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// One QMP session.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
    next_id: u64,
    events: Vec<Value>,
    /// QEMU's version, from the greeting: (major, minor, micro).
    pub version: (u64, u64, u64),
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).field("version", &self.version).finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves negotiation mode. `timeout` bounds every
    /// exchange.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect { path: path.to_owned(), source })?;
        let io = |source| QmpError::Io { path: path.to_owned(), source };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
            timeout,
            next_id: 1,
            events: vec![],
            version: (0, 0, 0),
        };
        let greeting = qmp.read_message("the greeting")?;
        let Some(v) = greeting.get("QMP").and_then(|q| q.get("version")).and_then(|v| v.get("qemu")) else {
            return Err(qmp.protocol(format!("not a QMP greeting: {}", short(&greeting))));
        };
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        qmp.version = (num("major"), num("minor"), num("micro"));
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn protocol(&self, message: String) -> QmpError {
        QmpError::Protocol { path: self.path.clone(), message }
    }

    /// Reads one JSON message, bounded in size.
    fn read_message(&mut self, waiting_for: &str) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader).take(MAX_LINE).read_until(b'\n', &mut line).map_err(|source| {
            if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                QmpError::Timeout { path: self.path.clone(), command: waiting_for.to_owned(), timeout: self.timeout }
            } else {
                QmpError::Io { path: self.path.clone(), source }
            }
        })?;
        if n == 0 {
            return Err(self.protocol(format!("QEMU closed the connection while we waited for {waiting_for}")));
        }
        if !line.ends_with(b"\n") {
            return Err(self.protocol(format!("a message over {MAX_LINE} bytes")));
        }
        serde_json::from_slice(&line).map_err(|e| self.protocol(format!("not JSON ({e})")))
    }

    /// Runs `command` with `arguments` and answers its `return` value. Events that arrive
    /// before the answer are kept (see [`Qmp::take_events`]).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).map_err(|source| QmpError::Io { path: self.path.clone(), source })?;
        loop {
            let answer = self.read_message(command)?;
            if answer.get("event").is_some() {
                self.events.push(answer);
                continue;
            }
            if answer.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(self.protocol(format!("an answer to another command: {}", short(&answer))));
            }
            if let Some(r) = answer.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = answer.get("error") {
                let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(self.protocol(format!("an answer with neither return nor error: {}", short(&answer))));
        }
    }

    /// Runs an HMP command line; HMP reports its errors as text, which is returned as is.
    pub fn hmp(&mut self, line: &str) -> Result<String, QmpError> {
        let r = self.execute("human-monitor-command", json!({ "command-line": line }))?;
        Ok(r.as_str().unwrap_or("").to_owned())
    }

    /// The events received so far (and forgets them).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// The run state (`running`, `paused`, `prelaunch`, …).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", json!({}))?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| self.protocol("query-status without a status".into()))
    }
}

/// A qemu-guest-agent session over its chardev socket. The guest agent has no greeting and no
/// ids: each session starts with `guest-sync-delimited`, whose 0xFF marker flushes whatever an
/// earlier, interrupted session left in the channel.
pub struct Qga {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
}

impl std::fmt::Debug for Qga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qga").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Qga {
    /// Connects and synchronizes; `timeout` bounds every exchange (a guest without a running
    /// agent never answers, and that is a timeout).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qga, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect { path: path.to_owned(), source })?;
        let io = |source| QmpError::Io { path: path.to_owned(), source };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qga = Qga { path: path.to_owned(), reader: BufReader::new(stream), writer, timeout };
        let token: u32 = rand::random::<u32>() & 0x7fff_ffff;
        qga.send("guest-sync-delimited", json!({ "id": token }))?;
        // Skip to the marker, then to the sync answer.
        let mut skipped = Vec::new();
        qga.reader.by_ref().take(MAX_LINE).read_until(0xff, &mut skipped).map_err(|e| qga.io_err(e, "guest-sync"))?;
        if skipped.last() != Some(&0xff) {
            return Err(QmpError::Protocol { path: path.to_owned(), message: "the guest agent never synced".into() });
        }
        loop {
            let v = qga.read_message("guest-sync")?;
            if v.get("return").and_then(Value::as_u64) == Some(u64::from(token)) {
                return Ok(qga);
            }
        }
    }

    fn io_err(&self, source: std::io::Error, waiting_for: &str) -> QmpError {
        if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            QmpError::Timeout { path: self.path.clone(), command: waiting_for.to_owned(), timeout: self.timeout }
        } else {
            QmpError::Io { path: self.path.clone(), source }
        }
    }

    fn send(&mut self, command: &str, arguments: Value) -> Result<(), QmpError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).map_err(|source| QmpError::Io { path: self.path.clone(), source })
    }

    fn read_message(&mut self, waiting_for: &str) -> Result<Value, QmpError> {
        loop {
            let mut line = Vec::new();
            let n = (&mut self.reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .map_err(|e| self.io_err(e, waiting_for))?;
            if n == 0 {
                return Err(QmpError::Protocol {
                    path: self.path.clone(),
                    message: format!("the guest agent channel closed while we waited for {waiting_for}"),
                });
            }
            // Stray bytes (a 0xFF marker, a half line of an earlier session) are skipped.
            let start = line.iter().position(|&b| b == b'{').unwrap_or(line.len());
            if let Ok(v) = serde_json::from_slice::<Value>(&line[start..]) {
                return Ok(v);
            }
        }
    }

    /// Runs a guest agent command and answers its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.send(command, arguments)?;
        let v = self.read_message(command)?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        let e = v.get("error").cloned().unwrap_or(Value::Null);
        let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Err(QmpError::Command { command: command.to_owned(), class: text("class"), desc: text("desc") })
    }
}

/// A message cut short for an error text.
fn short(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake monitor that greets, then answers each line with `answers` in turn.
    fn fake(answers: Vec<&'static str>) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}}, \"capabilities\": []}}\n").unwrap();
            for a in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                w.write_all(a.as_bytes()).unwrap();
            }
            std::thread::sleep(Duration::from_millis(500));
        });
        (dir, path, t)
    }

    #[test]
    fn events_are_kept_and_errors_carry_qemus_words() {
        let (_d, path, t) = fake(vec![
            "{\"return\": {}, \"id\": 1}\n",
            "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\"}, \"id\": 2}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Node 'x' not found\"}, \"id\": 3}\n",
        ]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version, (10, 0, 2));
        assert_eq!(q.status().unwrap(), "paused");
        assert_eq!(q.take_events().len(), 1);
        let e = q.execute("blockdev-del", json!({"node-name": "x"})).unwrap_err();
        assert_eq!(e.class(), Some("GenericError"));
        assert!(e.to_string().contains("Node 'x' not found"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn garbage_a_silent_monitor_and_no_socket_are_clear_errors() {
        let (_d, path, t) = fake(vec!["{\"return\": {}, \"id\": 1}\n", "not json\n"]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert!(matches!(q.status(), Err(QmpError::Protocol { .. })));
        t.join().unwrap();

        let (_d, path, t) = fake(vec!["{\"return\": {}, \"id\": 1}\n"]);
        let mut q = Qmp::connect(&path, Duration::from_millis(200)).unwrap();
        assert!(matches!(q.status(), Err(QmpError::Timeout { .. })), "a monitor that never answers times out");
        t.join().unwrap();

        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Qmp::connect(&dir.path().join("none.sock"), Duration::from_secs(1)),
            Err(QmpError::Connect { .. })
        ));
    }
}
