//! An NBD client over a unix socket, for QEMU's NBD server and `qemu-nbd`: the fixed newstyle
//! handshake, structured replies, meta contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`)
//! and `NBD_CMD_BLOCK_STATUS`, plus read, write and flush. One request at a time. Everything
//! the server sends is checked against what was asked (lengths, offsets, cookies) before it is
//! used, so a confused or hostile server gets a clear error, never a panic or a huge buffer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_FLAG_ERROR: u32 = 1 << 31;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the export is read-only.
const TFLAG_READ_ONLY: u16 = 1 << 1;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// The largest request we send, and so the largest payload we accept.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Option replies are small; anything bigger is refused.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The most extents one block-status chunk may carry.
const MAX_EXTENTS: u32 = 1 << 20;

/// `base:allocation` extent flag: a hole.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` extent flag: reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// Dirty-bitmap extent flag: dirty.
pub const STATE_DIRTY: u32 = 1;

/// Why an NBD exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to NBD socket {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("NBD socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("NBD server at {path}: {message}")]
    Protocol { path: PathBuf, message: String },
    /// The server answered a request with an error.
    #[error("NBD server at {path}: {what} failed: {message} (errno {errno})")]
    Server { path: PathBuf, what: String, errno: u32, message: String },
}

/// One extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// A connected export.
pub struct Nbd {
    path: PathBuf,
    stream: UnixStream,
    size: u64,
    read_only: bool,
    cookie: u64,
    /// Negotiated meta contexts: (id, name).
    contexts: Vec<(u32, String)>,
}

impl std::fmt::Debug for Nbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nbd").field("path", &self.path).field("size", &self.size).finish_non_exhaustive()
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

impl Nbd {
    /// Connects to `export` on the unix socket `path`, negotiating structured replies and the
    /// meta `contexts` asked for (each must be granted).
    pub fn connect(path: &Path, export: &str, contexts: &[&str], timeout: Duration) -> Result<Nbd, NbdError> {
        let stream = UnixStream::connect(path).map_err(|source| NbdError::Connect { path: path.to_owned(), source })?;
        let io = |source| NbdError::Io { path: path.to_owned(), source };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut nbd = Nbd { path: path.to_owned(), stream, size: 0, read_only: true, cookie: 1, contexts: Vec::new() };
        nbd.handshake(export, contexts)?;
        Ok(nbd)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn protocol(&self, message: impl Into<String>) -> NbdError {
        NbdError::Protocol { path: self.path.clone(), message: message.into() }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NbdError> {
        self.stream.read_exact(buf).map_err(|source| NbdError::Io { path: self.path.clone(), source })
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), NbdError> {
        self.stream.write_all(buf).map_err(|source| NbdError::Io { path: self.path.clone(), source })
    }

    fn handshake(&mut self, export: &str, contexts: &[&str]) -> Result<(), NbdError> {
        let mut hello = [0u8; 18];
        self.read_exact(&mut hello)?;
        if be64(&hello[0..8]) != NBDMAGIC || be64(&hello[8..16]) != IHAVEOPT {
            return Err(self.protocol("not a newstyle NBD server"));
        }
        let flags = be16(&hello[16..18]);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("the server does not speak fixed newstyle"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        self.write_all(&client_flags.to_be_bytes())?;

        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        match self.option_reply(OPT_STRUCTURED_REPLY)? {
            (REP_ACK, _) => {}
            (t, _) => return Err(self.protocol(format!("structured replies refused (reply {t:#x})"))),
        }

        if !contexts.is_empty() {
            let mut data = Vec::new();
            data.extend_from_slice(&(export.len() as u32).to_be_bytes());
            data.extend_from_slice(export.as_bytes());
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                data.extend_from_slice(&(c.len() as u32).to_be_bytes());
                data.extend_from_slice(c.as_bytes());
            }
            self.send_option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                match self.option_reply(OPT_SET_META_CONTEXT)? {
                    (REP_META_CONTEXT, d) if d.len() >= 4 => {
                        let name = String::from_utf8_lossy(&d[4..]).into_owned();
                        self.contexts.push((be32(&d[0..4]), name));
                    }
                    (REP_ACK, _) => break,
                    (t, _) => return Err(self.protocol(format!("meta context negotiation: reply {t:#x}"))),
                }
            }
            for c in contexts {
                if !self.contexts.iter().any(|(_, n)| n == c) {
                    return Err(self.protocol(format!("export {export:?} offers no meta context {c:?}")));
                }
            }
        }

        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &data)?;
        let mut got_export = false;
        loop {
            match self.option_reply(OPT_GO)? {
                (REP_INFO, d) if d.len() >= 2 => {
                    if be16(&d[0..2]) == INFO_EXPORT && d.len() >= 12 {
                        self.size = be64(&d[2..10]);
                        self.read_only = be16(&d[10..12]) & TFLAG_READ_ONLY != 0;
                        got_export = true;
                    }
                }
                (REP_INFO, _) => return Err(self.protocol("a truncated info reply")),
                (REP_ACK, _) => break,
                (t, _) => return Err(self.protocol(format!("export {export:?}: reply {t:#x}"))),
            }
        }
        if !got_export {
            return Err(self.protocol(format!("export {export:?}: the server never said its size")));
        }
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.write_all(&msg)
    }

    /// One option reply: (type, data). An error reply becomes an error with the server's text.
    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut head = [0u8; 20];
        self.read_exact(&mut head)?;
        if be64(&head[0..8]) != OPT_REPLY_MAGIC || be32(&head[8..12]) != option {
            return Err(self.protocol("an option reply out of step"));
        }
        let (kind, len) = (be32(&head[12..16]), be32(&head[16..20]));
        if len > MAX_OPTION_REPLY {
            return Err(self.protocol(format!("an option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data)?;
        if kind & REP_FLAG_ERROR != 0 {
            let text = String::from_utf8_lossy(&data).into_owned();
            return Err(self.protocol(format!("option {option} refused ({kind:#x}): {text}")));
        }
        Ok((kind, data))
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32, payload: &[u8]) -> Result<u64, NbdError> {
        let cookie = self.cookie;
        self.cookie += 1;
        let mut msg = Vec::with_capacity(28);
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&length.to_be_bytes());
        self.write_all(&msg)?;
        if !payload.is_empty() {
            self.write_all(payload)?;
        }
        Ok(cookie)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        if len > u64::from(MAX_REQUEST) || offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(self.protocol(format!("a request of {len} bytes at {offset} is outside the export")));
        }
        Ok(())
    }

    /// Reads a reply header; for a structured one answers (flags, type, payload length).
    /// A simple reply answers `None` after checking its error.
    fn reply_head(&mut self, cookie: u64, what: &str) -> Result<Option<(u16, u16, u32)>, NbdError> {
        let mut magic = [0u8; 4];
        self.read_exact(&mut magic)?;
        match be32(&magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                self.read_exact(&mut rest)?;
                if be64(&rest[4..12]) != cookie {
                    return Err(self.protocol("a reply to a request we did not send"));
                }
                let errno = be32(&rest[0..4]);
                if errno != 0 {
                    return Err(NbdError::Server {
                        path: self.path.clone(),
                        what: what.to_owned(),
                        errno,
                        message: String::new(),
                    });
                }
                Ok(None)
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut rest = [0u8; 16];
                self.read_exact(&mut rest)?;
                if be64(&rest[4..12]) != cookie {
                    return Err(self.protocol("a reply to a request we did not send"));
                }
                Ok(Some((be16(&rest[0..2]), be16(&rest[2..4]), be32(&rest[12..16]))))
            }
            m => Err(self.protocol(format!("a reply with magic {m:#x}"))),
        }
    }

    /// An error chunk's payload, turned into the error.
    fn error_chunk(&mut self, len: u32, what: &str) -> NbdError {
        if !(6..=MAX_OPTION_REPLY).contains(&len) {
            return self.protocol(format!("an error chunk of {len} bytes"));
        }
        let mut data = vec![0u8; len as usize];
        if let Err(e) = self.read_exact(&mut data) {
            return e;
        }
        let errno = be32(&data[0..4]);
        let mlen = usize::from(be16(&data[4..6])).min(data.len() - 6);
        let message = String::from_utf8_lossy(&data[6..6 + mlen]).into_owned();
        NbdError::Server { path: self.path.clone(), what: what.to_owned(), errno, message }
    }

    /// Reads `buf.len()` bytes at `offset`. Holes read as zeroes.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        self.check_range(offset, len)?;
        let cookie = self.request(CMD_READ, offset, len as u32, &[])?;
        let what = format!("read of {len} bytes at {offset}");
        let Some(mut head) = self.reply_head(cookie, &what)? else {
            // A simple reply to a read: the data follows.
            return self.read_exact(buf);
        };
        loop {
            let (flags, kind, plen) = head;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    if plen < 8 || u64::from(plen) - 8 > len {
                        return Err(self.protocol(format!("a data chunk of {plen} bytes for a read of {len}")));
                    }
                    let mut at = [0u8; 8];
                    self.read_exact(&mut at)?;
                    let start = be64(&at);
                    let n = u64::from(plen) - 8;
                    if start < offset || start + n > offset + len {
                        return Err(self.protocol("a data chunk outside the range read"));
                    }
                    let from = (start - offset) as usize;
                    self.read_exact(&mut buf[from..from + n as usize])?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if plen != 12 {
                        return Err(self.protocol("a hole chunk of the wrong size"));
                    }
                    let mut d = [0u8; 12];
                    self.read_exact(&mut d)?;
                    let (start, n) = (be64(&d[0..8]), u64::from(be32(&d[8..12])));
                    if start < offset || start + n > offset + len {
                        return Err(self.protocol("a hole chunk outside the range read"));
                    }
                    let from = (start - offset) as usize;
                    buf[from..from + n as usize].fill(0);
                }
                REPLY_TYPE_NONE if plen == 0 => {}
                k if k & REPLY_TYPE_ERROR_BIT != 0 => return Err(self.error_chunk(plen, &what)),
                k => return Err(self.protocol(format!("an unexpected chunk type {k} in a read reply"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok(());
            }
            head = self
                .reply_head(cookie, &what)?
                .ok_or_else(|| self.protocol("a simple reply in the middle of a structured one"))?;
        }
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<(), NbdError> {
        if self.read_only {
            return Err(self.protocol("the export is read-only"));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.check_range(offset, data.len() as u64)?;
        let cookie = self.request(CMD_WRITE, offset, data.len() as u32, data)?;
        self.simple_done(cookie, &format!("write of {} bytes at {offset}", data.len()))
    }

    /// Flushes the server's writes to stable storage.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        let cookie = self.request(CMD_FLUSH, 0, 0, &[])?;
        self.simple_done(cookie, "flush")
    }

    /// Waits for the reply of a command that carries no data.
    fn simple_done(&mut self, cookie: u64, what: &str) -> Result<(), NbdError> {
        loop {
            match self.reply_head(cookie, what)? {
                None => return Ok(()),
                Some((flags, kind, plen)) => {
                    if kind & REPLY_TYPE_ERROR_BIT != 0 {
                        return Err(self.error_chunk(plen, what));
                    }
                    if kind != REPLY_TYPE_NONE || plen != 0 {
                        return Err(self.protocol(format!("an unexpected chunk type {kind} for a {what}")));
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The extents of meta context `context` over `[offset, offset + length)`, walked to the
    /// end however the server splits its answers. Extents come in order and cover the range.
    pub fn block_status(&mut self, context: &str, offset: u64, length: u64) -> Result<Vec<Extent>, NbdError> {
        let Some(&(id, _)) = self.contexts.iter().find(|(_, n)| n == context) else {
            return Err(self.protocol(format!("meta context {context:?} was not negotiated")));
        };
        let end = offset.checked_add(length).filter(|&e| e <= self.size).ok_or_else(|| {
            self.protocol(format!("block status of {length} bytes at {offset} is outside the export"))
        })?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            // Ask for at most 1 GiB at a time, aligned, so the length fits its 32 bits.
            let ask = (end - pos).min(1 << 30) as u32;
            let what = format!("block status at {pos}");
            let cookie = self.request(CMD_BLOCK_STATUS, pos, ask, &[])?;
            let mut covered = pos;
            loop {
                let (flags, kind, plen) =
                    self.reply_head(cookie, &what)?.ok_or_else(|| self.protocol("a simple reply to block status"))?;
                match kind {
                    REPLY_TYPE_BLOCK_STATUS => {
                        if plen < 12 || (plen - 4) % 8 != 0 || (plen - 4) / 8 > MAX_EXTENTS {
                            return Err(self.protocol(format!("a block status chunk of {plen} bytes")));
                        }
                        let mut data = vec![0u8; plen as usize];
                        self.read_exact(&mut data)?;
                        // Chunks of other negotiated contexts are read and skipped.
                        if be32(&data[0..4]) != id {
                            if flags & REPLY_FLAG_DONE != 0 {
                                break;
                            }
                            continue;
                        }
                        let mut at = pos;
                        for e in data[4..].chunks_exact(8) {
                            let (len, fl) = (u64::from(be32(&e[0..4])), be32(&e[4..8]));
                            if len == 0 {
                                return Err(self.protocol("an empty extent"));
                            }
                            let len = len.min(end - at);
                            if len == 0 {
                                break;
                            }
                            match out.last_mut() {
                                Some(last) if last.flags == fl && last.offset + last.length == at => last.length += len,
                                _ => out.push(Extent { offset: at, length: len, flags: fl }),
                            }
                            at += len;
                        }
                        covered = covered.max(at);
                    }
                    REPLY_TYPE_NONE if plen == 0 => {}
                    k if k & REPLY_TYPE_ERROR_BIT != 0 => return Err(self.error_chunk(plen, &what)),
                    k => return Err(self.protocol(format!("an unexpected chunk type {k} in a block status reply"))),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
            if covered <= pos {
                return Err(self.protocol("a block status answer that covers nothing"));
            }
            pos = covered;
        }
        Ok(out)
    }

    /// Says goodbye (the server may then exit, like `qemu-nbd` without `--persistent`).
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The block indices (of `block_size`) that any extent matching `want` touches, in order,
/// once each.
pub fn blocks_of(extents: &[Extent], block_size: u64, want: impl Fn(u32) -> bool) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for e in extents.iter().filter(|e| want(e.flags) && e.length > 0) {
        let first = e.offset / block_size;
        let last = (e.offset + e.length - 1) / block_size;
        let from = out.last().map_or(first, |&l| first.max(l + 1));
        out.extend(from..=last);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_extents_are_each_block_once_in_order() {
        let mb = 1u64 << 20;
        let ex = [
            Extent { offset: 0, length: 64 << 10, flags: 1 },
            Extent { offset: 64 << 10, length: mb, flags: 0 },
            Extent { offset: mb + (64 << 10), length: 64 << 10, flags: 1 },
            Extent { offset: 3 * mb - 1, length: 2, flags: 1 },
        ];
        assert_eq!(blocks_of(&ex, mb, |f| f & STATE_DIRTY != 0), vec![0, 1, 2, 3]);
        assert_eq!(blocks_of(&ex, mb, |f| f & STATE_DIRTY == 0), vec![0, 1]);
        assert!(blocks_of(&[], mb, |_| true).is_empty());
    }
}
