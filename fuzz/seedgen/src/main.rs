//! Writes seeds for the protocol fuzz targets into `fuzz/seeds/TARGET/NAME`. Each target's input
//! layout is described in its own file (fuzz/fuzz_targets/TARGET.rs): most take two selector
//! bytes before the wire.

use bulwark_protocol::blockmap::TreeRoot;
use bulwark_protocol::codec;
use bulwark_protocol::frame::encode_frame;
use bulwark_protocol::messages::{
    AdminEnvelope, AdminRequest, AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse, Hello,
    Welcome,
};
use bulwark_protocol::transfer::{block_body, message_body, zero_body, TransferMessage, TransferMode};
use bulwark_protocol::{HostId, JobId, PROTOCOL_VERSION};
use std::path::{Path, PathBuf};

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../seeds");
    let host = HostId::new("node1")?;
    let hello = AgentMessage::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        host: host.clone(),
        agent_version: "0.1.0".into(),
    });
    let enroll = EnrollRequest {
        version: PROTOCOL_VERSION,
        token_secret: vec![7; 32],
        host: host.clone(),
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n".into(),
    };
    let admin = AdminEnvelope { version: PROTOCOL_VERSION, request: AdminRequest::AgentRevoke { host } };
    let transfer_messages = [
        TransferMessage::Open { job: 1, disk: "disk0".into(), block_size: 4096, blocks: 16, mode: TransferMode::Blocks },
        TransferMessage::End { blocks_sent: 2, bytes_read: 8192 },
        TransferMessage::Root { root: TreeRoot { digest: [3; 32], levels: 1, blocks: 16 }, bytes_read: 0 },
        TransferMessage::WantPages { nodes: vec![(1, 0), (0, 3)] },
        TransferMessage::Pages { pages: vec![vec![[1; 32], [0; 32]]] },
        TransferMessage::WantBlocks { indices: vec![0, 5, 9] },
        TransferMessage::Stored { blocks: 3 },
        TransferMessage::Item {
            rel: vec![b"etc".to_vec(), b"hosts".to_vec()],
            kind: "file".into(),
            mode: 0o644,
            mtime: 1_700_000_000,
            size: 12,
            target: None,
        },
        TransferMessage::Failed { reason: "disk gone".into() },
    ];

    let mut codec_seeds: Seeds = vec![
        ("hello", codec::encode(&hello)?),
        ("heartbeat", codec::encode(&AgentMessage::Heartbeat)?),
        ("enroll-request", codec::encode(&enroll)?),
        ("admin-agent-revoke", codec::encode(&admin)?),
        ("admin-status", codec::encode(&AdminEnvelope { version: PROTOCOL_VERSION, request: AdminRequest::Status })?),
        (
            "welcome",
            codec::encode(&CoordinatorMessage::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                coordinator: "coordinator".into(),
                heartbeat_secs: 5,
            }))?,
        ),
        ("job-done", codec::encode(&CoordinatorMessage::JobDone { job: JobId(4), committed: true })?),
        ("enroll-refused", codec::encode(&EnrollResponse::Refused { reason: "expired".into() })?),
    ];
    for (i, m) in transfer_messages.iter().enumerate() {
        codec_seeds.push((TRANSFER_NAMES[i], codec::encode(m)?));
    }

    // Transfer streams: block size selector 0x80 (4 KiB), whole reads; then one wire each.
    let data = [5u8; 300];
    let mut conversation = Vec::new();
    let open = message_body(&transfer_messages[0])?;
    for body in [open, block_body(0, &[9; 32], &data), zero_body(1), message_body(&transfer_messages[1])?] {
        conversation.extend(encode_frame(&body, 1 << 21)?);
    }
    let mut transfer_seeds: Seeds = vec![("blocks-conversation", [&[0x80, 0][..], &conversation].concat())];
    for (i, m) in transfer_messages.iter().enumerate() {
        let wire = encode_frame(&message_body(m)?, 1 << 21)?;
        transfer_seeds.push((TRANSFER_NAMES[i], [&[0x80, 3][..], &wire].concat()));
    }

    // Frames: control limit, reads of 7 bytes; then three frames.
    let mut frames = Vec::new();
    for body in [&b"a"[..], &[0u8; 40][..], &codec::encode(&hello)?[..]] {
        frames.extend(encode_frame(body, 1 << 20)?);
    }
    let frame_seeds: Seeds = vec![("three-frames", [&[0, 7][..], &frames].concat())];

    // Handshake: conversation 0 (agent hello), 1 (enrollment), 2 (admin).
    let handshake_seeds: Seeds = vec![
        ("hello", [&[0, 0][..], &encode_frame(&codec::encode(&hello)?, 1 << 20)?].concat()),
        ("enroll", [&[1, 0][..], &encode_frame(&codec::encode(&enroll)?, 1 << 20)?].concat()),
        ("admin", [&[2, 5][..], &encode_frame(&codec::encode(&admin)?, 1 << 20)?].concat()),
    ];

    for (target, seeds) in
        [("codec", codec_seeds), ("transfer", transfer_seeds), ("frame", frame_seeds), ("handshake", handshake_seeds)]
    {
        write(&root.join(target), &seeds)?;
    }
    Ok(())
}

const TRANSFER_NAMES: [&str; 9] = [
    "transfer-open",
    "transfer-end",
    "transfer-root",
    "transfer-want-pages",
    "transfer-pages",
    "transfer-want-blocks",
    "transfer-stored",
    "transfer-item",
    "transfer-failed",
];

fn write(dir: &Path, seeds: &Seeds) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
    Ok(())
}
