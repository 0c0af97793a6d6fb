//! The items worker: the child process (`bulwark-coordinator x-items`, started by
//! [`super::sandbox`]) that reads a guest's partition tables and file systems. It reads its
//! request from stdin, confines itself before touching a byte of the guest (address space,
//! CPU time, no new files, no core dumps, its own empty network namespace where the kernel
//! allows), then asks the coordinator for each block it needs and answers on stdout. It holds
//! no key, no catalog and no socket: all it can do is read the one disk it was given.

use super::disk::{BlockSource, DiskReader};
use super::pipe::{self, Op, Reply, Request};
use super::{Emit, ItemsError, ITEM_CHUNK};
use bulwark_protocol::codec;
use std::cell::RefCell;
use std::io::{self, BufReader, BufWriter, Stdin, Stdout, Write};
use std::process::ExitCode;
use std::rc::Rc;

struct Pipe {
    input: BufReader<Stdin>,
    output: BufWriter<Stdout>,
}

impl Pipe {
    fn reply(&mut self, r: &Reply) -> io::Result<()> {
        let body = codec::encode(r).map_err(io::Error::other)?;
        pipe::write_frame(&mut self.output, pipe::REPLY, &body)
    }
}

/// Blocks asked of the coordinator, one at a time.
struct PipeBlocks(Rc<RefCell<Pipe>>);

impl BlockSource for PipeBlocks {
    fn read_block(&mut self, index: u64) -> io::Result<Vec<u8>> {
        let mut p = self.0.borrow_mut();
        pipe::write_frame(&mut p.output, pipe::READ_BLOCK, &index.to_le_bytes())?;
        p.output.flush()?;
        match pipe::read_frame(&mut p.input)? {
            Some((pipe::BLOCK, data)) => Ok(data),
            Some((pipe::BLOCK_ERROR, why)) => Err(io::Error::other(String::from_utf8_lossy(&why).into_owned())),
            Some((kind, _)) => Err(io::Error::other(format!("unexpected frame {kind} from the coordinator"))),
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the coordinator went away")),
        }
    }
}

/// Limits the worker puts on itself (and anything it could start).
fn confine(req: &Request) {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let set = |r: Resource, cur: u64, max: u64| {
        let _ = setrlimit(r, Rlimit { current: Some(cur), maximum: Some(max) });
    };
    set(Resource::As, req.memory_bytes, req.memory_bytes);
    set(Resource::Cpu, req.cpu_secs, req.cpu_secs + 1);
    set(Resource::Fsize, 0, 0);
    set(Resource::Core, 0, 0);
    // stdin, stdout, stderr and nothing more.
    set(Resource::Nofile, 4, 4);
    // A network namespace of its own holds only a loopback that is down. Needs CAP_SYS_ADMIN
    // (the coordinator runs as root on most backup servers); without it the worker still
    // opens no socket. `unshare` is deprecated in rustix for CLONE_FILES' sake, which is not
    // used here.
    #[allow(deprecated)]
    let _ = rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNET);
}

/// Runs the worker on stdin/stdout; the exit code is 0 whenever an answer (even a failure)
/// was sent.
pub fn main() -> ExitCode {
    let pipe = Rc::new(RefCell::new(Pipe {
        input: BufReader::new(io::stdin()),
        output: BufWriter::with_capacity(ITEM_CHUNK + 64, io::stdout()),
    }));
    let req: Request = {
        let mut p = pipe.borrow_mut();
        match pipe::read_frame(&mut p.input) {
            Ok(Some((pipe::REQUEST, body))) => match codec::decode(&body) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("items worker: bad request: {e}");
                    return ExitCode::FAILURE;
                }
            },
            _ => {
                eprintln!("items worker: no request on stdin");
                return ExitCode::FAILURE;
            }
        }
    };
    confine(&req);
    let disk = DiskReader::new(Box::new(PipeBlocks(pipe.clone())), req.geometry);
    let send = |r: Reply| pipe.borrow_mut().reply(&r).map_err(|e| e.to_string());
    let result: Result<(), ItemsError> = match &req.op {
        Op::Swap => super::swap_ranges(&disk, req.geometry.block_size)
            .and_then(|r| send(Reply::Swap(r)).map_err(ItemsError::Worker)),
        Op::List { path, after, limit } => {
            super::list_page(&disk, path, after.as_deref(), *limit as usize, &mut |i| send(Reply::Item(i)))
                .and_then(|next| send(Reply::Next(next)).map_err(ItemsError::Worker))
        }
        Op::Copy { paths } => super::copy_out(&disk, paths, &mut |e| match e {
            Emit::Entry { rel, item } => send(Reply::Entry { rel, item }),
            Emit::Skipped { path, reason } => send(Reply::Skipped { path, reason }),
            Emit::Data(bytes) => {
                let mut p = pipe.borrow_mut();
                for c in bytes.chunks(ITEM_CHUNK) {
                    pipe::write_frame(&mut p.output, pipe::DATA, c).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        }),
    };
    let last = match result {
        Ok(()) => Reply::Done,
        Err(e) => Reply::Failed(e),
    };
    let mut p = pipe.borrow_mut();
    match p.reply(&last).and_then(|()| p.output.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
