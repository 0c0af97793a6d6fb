//! The NBD protocol's numbers and its fixed-size headers, parsed and built as plain functions
//! (no I/O). Everything a client sends is checked against a bound before anything is
//! allocated for it.

/// `NBDMAGIC`: the first eight bytes of the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the greeting's second magic, and the start of every option a client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Errors of a simple reply (Linux errno values, as the protocol says).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// The longest option payload accepted: an export name may be 4,096 bytes, plus the
/// information requests of `NBD_OPT_GO`.
pub const MAX_OPTION_LEN: u32 = 4096 + 4 + 2 + 2 * 32;
/// The most options one connection may send before it picks an export.
pub const MAX_OPTIONS: usize = 64;
/// The longest read or write one request may ask for (advertised as the maximum block size).
pub const MAX_REQUEST_LEN: u32 = 32 << 20;

/// Why a client's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the client did not speak fixed newstyle NBD (client flags {0:#x})")]
    ClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes (at most {MAX_OPTION_LEN})")]
    OptionTooLong { option: u32, len: u32 },
    #[error("bad request magic {0:#x}")]
    RequestMagic(u32),
    #[error("a request for {0} bytes (at most {MAX_REQUEST_LEN})")]
    RequestTooLong(u32),
    #[error("more than {MAX_OPTIONS} options before an export was chosen")]
    TooManyOptions,
}

/// The server's greeting.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// The client's flags: answers whether it wants the export-name reply without its 124 zero
/// bytes.
pub fn client_flags(flags: u32) -> Result<bool, WireError> {
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 || flags & !known != 0 {
        return Err(WireError::ClientFlags(flags));
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

/// An option's header: `IHAVEOPT`, the option, its payload's length (checked).
pub fn option_header(b: &[u8; 16]) -> Result<(u32, u32), WireError> {
    let (magic, rest) = b.split_at(8);
    let magic = u64::from_be_bytes(magic.try_into().unwrap_or_default());
    if magic != IHAVEOPT {
        return Err(WireError::OptionMagic(magic));
    }
    let option = u32::from_be_bytes(rest[..4].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(rest[4..].try_into().unwrap_or_default());
    if len > MAX_OPTION_LEN {
        return Err(WireError::OptionTooLong { option, len });
    }
    Ok((option, len))
}

/// An option reply: header and payload.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&option.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

/// The export `NBD_OPT_GO` / `NBD_OPT_INFO` ask for: its name (the information requests
/// that follow are not needed: the server always sends the size and the block sizes).
pub fn go_export_name(data: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(len)?)?;
    let rest = data.get(4 + len..)?;
    let requests = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    (rest.len() == 2 + 2 * requests).then_some(name)
}

/// `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// `NBD_INFO_BLOCK_SIZE`: any alignment works, `preferred` is best, at most
/// [`MAX_REQUEST_LEN`] per request.
pub fn info_block_size(preferred: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&preferred.clamp(512, MAX_REQUEST_LEN).to_be_bytes());
    d.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
    d
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parses a request header. A write longer than [`MAX_REQUEST_LEN`] is refused here: its
/// payload follows the header, so the connection cannot go on after it (a read that long is
/// answered EINVAL by the server).
pub fn request(b: &[u8; 28]) -> Result<Request, WireError> {
    let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap_or_default());
    let u16_at = |i: usize| u16::from_be_bytes(b[i..i + 2].try_into().unwrap_or_default());
    let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let magic = u32_at(0);
    if magic != REQUEST_MAGIC {
        return Err(WireError::RequestMagic(magic));
    }
    let r = Request { flags: u16_at(4), command: u16_at(6), cookie: u64_at(8), offset: u64_at(16), len: u32_at(24) };
    if r.command == CMD_WRITE && r.len > MAX_REQUEST_LEN {
        return Err(WireError::RequestTooLong(r.len));
    }
    Ok(r)
}

/// A simple reply's header (a successful read's data follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..].copy_from_slice(&cookie.to_be_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_flags_must_be_fixed_newstyle_and_known() {
        assert_eq!(client_flags(1), Ok(false));
        assert_eq!(client_flags(3), Ok(true));
        assert!(client_flags(0).is_err(), "old newstyle is not spoken");
        assert!(client_flags(1 | 1 << 9).is_err(), "unknown flags are refused");
    }

    #[test]
    fn options_are_bounded_before_anything_is_read() {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(option_header(&h), Ok((OPT_GO, 10)));
        h[12..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(option_header(&h), Err(WireError::OptionTooLong { .. })));
        h[0] ^= 1;
        assert!(matches!(option_header(&h), Err(WireError::OptionMagic(_))));
    }

    #[test]
    fn go_names_are_parsed_within_their_payload() {
        let mut d = vec![];
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(go_export_name(&d), Some(&b"abc"[..]));
        assert_eq!(go_export_name(&d[..d.len() - 1]), None, "a short request list");
        let mut long = d.clone();
        long[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(go_export_name(&long), None, "a name longer than the payload");
        assert_eq!(go_export_name(&[]), None);
    }

    #[test]
    fn requests_longer_than_the_bound_are_refused() {
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(request(&b), Ok(Request { flags: 0, command: CMD_WRITE, cookie: 7, offset: 4096, len: 512 }));
        b[24..].copy_from_slice(&(MAX_REQUEST_LEN + 1).to_be_bytes());
        assert_eq!(request(&b), Err(WireError::RequestTooLong(MAX_REQUEST_LEN + 1)));
        // A read that long is the server's to answer (EINVAL): the connection goes on.
        b[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        assert!(request(&b).is_ok());
        b[0] = 0;
        assert!(matches!(request(&b), Err(WireError::RequestMagic(_))));
    }
}
