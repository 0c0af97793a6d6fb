//! The protocol targets' checks. Each takes libFuzzer's raw input (its layout is described on
//! the function) and panics on anything a decoder must never do: disagree with its reference,
//! yield a frame over its limit, decode a value that does not re-encode to itself, or accept
//! what the handshake must refuse. A decoder that panics on its own fails them too.

// A check reports a failure by panicking: that is what libFuzzer and the replaying tests catch.
#![allow(clippy::panic)]

use crate::stream::{block_on, PieceReader};
use bulwark_protocol::block::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use bulwark_protocol::codec::{self, CONTROL_LIMIT};
use bulwark_protocol::frame::{self, read_frame, read_message, FrameDecoder, HEADER_LEN};
use bulwark_protocol::handshake::{accept_hello, check_version};
use bulwark_protocol::messages::{
    AdminEnvelope, AdminResponse, AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse,
};
use bulwark_protocol::transfer::{self, frame_limit, TransferFrame, TransferMessage};
use bulwark_protocol::{HostId, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// The frame layer: every byte any peer sends first meets a length-prefixed frame reader.
///
/// Input: one byte choosing the limit, one shaping the reads, then the wire. Checks that the
/// sans-IO [`FrameDecoder`] (fed in pieces) and the async [`read_frame`] the daemons call
/// agree frame by frame and on how the wire ends, that no frame is empty or over the limit, and
/// that the frames are exactly the wire's bytes.
pub fn check_frame(data: &[u8]) {
    let [limit_sel, shape, wire @ ..] = data else { return };
    // The limits the daemons use (control streams, transfer streams of 4 KiB blocks), and small
    // ones so that "too large" is reachable within a short input.
    let limit = match limit_sel % 4 {
        0 => CONTROL_LIMIT,
        1 => frame_limit(MIN_BLOCK_SIZE),
        _ => usize::from(limit_sel / 4) + 1,
    };

    // The sans-IO decoder, fed in pieces.
    let piece = usize::from(*shape & 0x7f).max(1);
    let mut decoder = FrameDecoder::new(limit);
    let mut sans_io = Vec::new();
    let mut sans_io_err = None;
    'feed: for chunk in wire.chunks(piece) {
        decoder.feed(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => sans_io.push(f),
                Ok(None) => break,
                Err(e) => {
                    sans_io_err = Some(e);
                    break 'feed;
                }
            }
        }
    }
    let sans_io_end = match sans_io_err {
        Some(e) => Some(e),
        None => decoder.finish().err(),
    };

    // The async reader over a stream that delivers the same bytes in pieces.
    let mut r = PieceReader::new(wire, *shape);
    let mut frames = Vec::new();
    let end = loop {
        match block_on(read_frame(&mut r, limit)) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };

    assert_eq!(frames, sans_io, "the async reader and the sans-IO decoder disagree");
    let mut at = 0;
    for f in &frames {
        assert!(!f.is_empty() && f.len() <= limit, "a frame of {} bytes passed a limit of {limit}", f.len());
        let header = u32::try_from(f.len()).map(u32::to_be_bytes).ok();
        assert_eq!(wire.get(at..at + HEADER_LEN), header.as_ref().map(|h| &h[..]));
        assert_eq!(wire.get(at + HEADER_LEN..at + HEADER_LEN + f.len()), Some(&f[..]));
        at += HEADER_LEN + f.len();
    }
    match (&end, &sans_io_end) {
        (None, None) => assert_eq!(at, wire.len(), "bytes left over without an error"),
        (Some(a), Some(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("the async reader ended with {a:?}, the decoder with {b:?}"),
    }
}

/// Transfer streams: blocks, zeros and messages of a job's per-disk streams, read as the
/// coordinator and the agent read them ([`transfer::read`], straight off the stream).
///
/// Input: one byte choosing the stream's block size, one shaping the reads, then the wire.
/// Checks that `read` (which reads a block's data straight into its own buffer) gives exactly
/// what the frame decoder plus [`TransferFrame::parse`] give, frame by frame; that a block
/// carries 1 ..= block size bytes; and that every message decoded re-encodes to itself.
pub fn check_transfer(data: &[u8]) {
    let [size_sel, shape, wire @ ..] = data else { return };
    // Every block size a disk may have (4 KiB ..= 16 MiB: the coordinator reads `Open` at 4 KiB,
    // the agent's item stream uses 1 MiB), and tiny ones so that "more data than the block
    // size" is reachable within a short input.
    let block_size = if *size_sel & 0x80 != 0 {
        (MIN_BLOCK_SIZE << (size_sel & 0x0f)).min(MAX_BLOCK_SIZE)
    } else {
        usize::from(*size_sel) + 1
    };

    // The reference: whole frames first, then parse.
    let mut decoder = FrameDecoder::new(frame_limit(block_size));
    decoder.feed(wire);
    let mut reference = Vec::new();
    let reference_end = loop {
        match decoder.next_frame() {
            Ok(Some(body)) => match TransferFrame::parse(body, block_size) {
                Ok(f) => reference.push(f),
                Err(e) => break Some(e.to_string()),
            },
            Ok(None) => break decoder.finish().err().map(|e| e.to_string()),
            Err(e) => break Some(e.to_string()),
        }
    };

    let mut r = PieceReader::new(wire, *shape);
    let mut frames = Vec::new();
    let end = loop {
        match block_on(transfer::read(&mut r, block_size)) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break None,
            Err(e) => break Some(e.to_string()),
        }
    };

    assert_eq!(frames, reference, "transfer::read and parse disagree");
    // `read` refuses a block frame with too much data from its header, before the data has
    // arrived; the decoder waits for the whole frame first. Only then may their errors differ.
    match (&end, &reference_end) {
        (None, None) => {}
        (Some(a), Some(b)) if a == b => {}
        (Some(a), Some(b)) if a.contains("more data than the block size") && b.contains("stream ended") => {}
        (a, b) => panic!("transfer::read ended with {a:?}, the reference with {b:?}"),
    }

    for f in &frames {
        match f {
            TransferFrame::Block { data, .. } => assert!(!data.is_empty() && data.len() <= block_size),
            TransferFrame::Zero { .. } => {}
            TransferFrame::Message(m) => transfer_round_trip(m),
        }
    }
}

fn transfer_round_trip(m: &TransferMessage) {
    let bytes = codec::encode(m).unwrap_or_else(|e| panic!("{m:?} was decoded but does not encode: {e}"));
    let back: TransferMessage = codec::decode(&bytes).unwrap_or_else(|e| panic!("{m:?} does not decode again: {e}"));
    assert_eq!(&back, m);
}

/// The codec: every message type a daemon accepts from the network, decoded as it decodes
/// them ([`frame::read_message`], bincode with the 1 MiB control limit).
///
/// Who reads what: the coordinator `EnrollRequest` (enrollment), `AgentMessage` (an agent's
/// control stream), `AdminEnvelope` (the console) and `TransferMessage` (transfer streams); the
/// agent `EnrollResponse`, `CoordinatorMessage` and `TransferMessage`; the console
/// `AdminResponse`. The input is one message body; each type decodes it. Checks that the framed
/// read and a plain decode agree, and that whatever decodes re-encodes and decodes to itself
/// (a decoded value the encoder refuses, or one that changes on the way, is a bug).
pub fn check_codec(body: &[u8]) {
    let Ok(len) = u32::try_from(body.len()) else { return };
    let mut wire = len.to_be_bytes().to_vec();
    wire.extend_from_slice(body);
    decodes_as_it_encodes::<EnrollRequest>(body, &wire);
    decodes_as_it_encodes::<AgentMessage>(body, &wire);
    decodes_as_it_encodes::<AdminEnvelope>(body, &wire);
    decodes_as_it_encodes::<TransferMessage>(body, &wire);
    decodes_as_it_encodes::<EnrollResponse>(body, &wire);
    decodes_as_it_encodes::<CoordinatorMessage>(body, &wire);
    decodes_as_it_encodes::<AdminResponse>(body, &wire);
}

/// Values are compared by their encoding: some messages carry floats, and a NaN is a value the
/// codec must carry faithfully even though it is not equal to itself.
fn decodes_as_it_encodes<T: Serialize + DeserializeOwned + Debug>(body: &[u8], wire: &[u8]) {
    let plain = codec::decode::<T>(body);
    let framed = block_on(frame::read_message::<T, _>(&mut PieceReader::new(wire, 0)));
    let msg = match (plain, framed) {
        (Ok(a), Ok(Some(b))) => {
            assert_eq!(codec::encode(&a).ok(), codec::encode(&b).ok(), "decode gave {a:?}, read_message {b:?}");
            a
        }
        (Err(_), Err(_)) => return,
        (a, b) => panic!("decode gave {a:?}, read_message gave {b:?}"),
    };
    assert!(body.len() <= CONTROL_LIMIT);
    let bytes = codec::encode(&msg).unwrap_or_else(|e| panic!("{msg:?} was decoded but does not encode: {e}"));
    assert!(bytes.len() <= body.len(), "re-encoding {msg:?} grew it");
    let back = codec::decode::<T>(&bytes).unwrap_or_else(|e| panic!("{msg:?} does not decode again: {e}"));
    let again = codec::encode(&back).unwrap_or_else(|e| panic!("{back:?} does not encode again: {e}"));
    assert_eq!(again, bytes, "{msg:?} changed on its way through the codec: {back:?}");
}

/// The first exchange of each connection, as the coordinator runs it: the first frame of an
/// agent's control stream must be a `Hello` that [`accept_hello`] welcomes for the host its
/// certificate names; an enrollment request and an admin envelope carry a version that
/// [`check_version`] must accept.
///
/// Input: one byte choosing the conversation, one shaping the reads, then the wire. Checks that
/// a welcome is only ever given to the certified host, at the highest version both sides
/// speak, and that no version outside this build's range is accepted.
pub fn check_handshake(data: &[u8]) {
    let [conversation, shape, wire @ ..] = data else { return };
    let mut r = PieceReader::new(wire, *shape);
    match conversation % 3 {
        0 => {
            let Ok(Some(AgentMessage::Hello(hello))) = block_on(read_message::<AgentMessage, _>(&mut r)) else {
                return;
            };
            let Ok(certified) = HostId::new("node1") else { return };
            let Ok(welcome) = accept_hello(&hello, &certified, "coordinator", 5) else { return };
            assert_eq!(hello.host, certified, "a hello for another host was welcomed");
            let highest = PROTOCOL_VERSION.min(hello.max_version);
            assert_eq!(welcome.version, highest, "not the highest common version");
            assert!(welcome.version >= MIN_PROTOCOL_VERSION.max(hello.min_version));
        }
        1 => {
            if let Ok(Some(req)) = block_on(read_message::<EnrollRequest, _>(&mut r)) {
                accepted_only_in_range(req.version);
            }
        }
        _ => {
            if let Ok(Some(env)) = block_on(read_message::<AdminEnvelope, _>(&mut r)) {
                accepted_only_in_range(env.version);
            }
        }
    }
}

fn accepted_only_in_range(version: u16) {
    let accepted = check_version(version).is_ok();
    assert_eq!(accepted, (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version), "version {version}");
}
