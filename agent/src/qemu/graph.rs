//! The QEMU block graph as the backend shapes it: live and snapshot dirty bitmaps (online
//! through QMP, offline with `qemu-img`), the fleecing nodes under a running guest and their
//! NBD exports, `qemu-nbd` for a VM that is off, and the checks that a definition matches
//! what QEMU runs.

use super::*;

impl QemuBackend {
    /// Makes sure every disk has its live bitmap. Answers whether tracking was lost (a bitmap
    /// missing or inconsistent, or an inconsistent snapshot bitmap), in which case stale
    /// snapshot bitmaps are dropped too.
    pub(super) fn ensure_tracking_online(&self, q: &mut Qmp, def: &VmDef) -> Result<bool, BackendError> {
        let nodes = q.execute("query-named-block-nodes", json!({ "flat": true })).map_err(failed)?;
        let mut lost = false;
        for d in &def.disks {
            let node = find_node(&nodes, &d.node)
                .ok_or_else(|| failed(format!("{}: QEMU has no block node {} (disk {})", def.name, d.node, d.name)))?;
            let bitmaps = node.get("dirty-bitmaps").and_then(Value::as_array).cloned().unwrap_or_default();
            let get = |name: &str| bitmaps.iter().find(|b| b.get("name").and_then(Value::as_str) == Some(name));
            let bad = |b: &Value| b.get("inconsistent").and_then(Value::as_bool).unwrap_or(false);
            match get(LIVE_BITMAP) {
                Some(b) if !bad(b) => {}
                Some(_) => {
                    tracing::warn!(vm = %def.name, disk = %d.name, "the dirty bitmap is inconsistent (QEMU was killed): tracking lost");
                    remove_bitmap_online(q, &d.node, LIVE_BITMAP)?;
                    lost = true;
                }
                None => lost = true,
            }
            if get(SNAP_BITMAP).is_some_and(bad) {
                lost = true;
            }
        }
        if lost {
            for d in &def.disks {
                remove_bitmap_online(q, &d.node, SNAP_BITMAP)?;
                remove_bitmap_online(q, &d.node, LIVE_BITMAP)?;
                q.execute(
                    "block-dirty-bitmap-add",
                    json!({ "node": d.node, "name": LIVE_BITMAP, "persistent": d.format == "qcow2" }),
                )
                .map_err(failed)?;
            }
        }
        Ok(lost)
    }

    /// The same for a VM that is off, on the images themselves. Raw images cannot keep a
    /// bitmap: their changes while off are unknown, so tracking is always lost.
    pub(super) fn ensure_tracking_offline(&self, def: &VmDef) -> Result<bool, BackendError> {
        let mut lost = false;
        for d in &def.disks {
            if d.format != "qcow2" {
                lost = true;
                continue;
            }
            let bitmaps = offline_bitmaps(&d.path)?;
            let get = |name: &str| bitmaps.iter().find(|(n, _)| n == name);
            match get(LIVE_BITMAP) {
                Some((_, in_use)) if !in_use => {}
                Some(_) => lost = true,
                None => lost = true,
            }
            if get(SNAP_BITMAP).is_some_and(|(_, in_use)| *in_use) {
                lost = true;
            }
        }
        if lost {
            for d in def.disks.iter().filter(|d| d.format == "qcow2") {
                let bitmaps = offline_bitmaps(&d.path)?;
                for name in [SNAP_BITMAP, LIVE_BITMAP] {
                    if bitmaps.iter().any(|(n, _)| n == name) {
                        qemu_img(&["bitmap", "--remove", "-f", "qcow2"], &d.path, name)?;
                    }
                }
                qemu_img(&["bitmap", "--add", "-f", "qcow2"], &d.path, LIVE_BITMAP)?;
            }
        }
        Ok(lost)
    }

    /// Builds the fleecing graph and NBD exports of a running VM (stopped by the caller).
    pub(super) fn fleece(&self, q: &mut Qmp, def: &VmDef) -> Result<(), BackendError> {
        let mut actions = vec![];
        let nodes = q.execute("query-named-block-nodes", json!({ "flat": true })).map_err(failed)?;
        for d in &def.disks {
            let has_snap = find_node(&nodes, &d.node)
                .and_then(|n| n.get("dirty-bitmaps").and_then(Value::as_array))
                .is_some_and(|b| b.iter().any(|b| b.get("name").and_then(Value::as_str) == Some(SNAP_BITMAP)));
            if !has_snap {
                actions.push(json!({ "type": "block-dirty-bitmap-add", "data": {
                    "node": d.node, "name": SNAP_BITMAP, "persistent": d.format == "qcow2", "disabled": true } }));
            }
            // Changes an unconfirmed earlier run left in the snapshot bitmap stay there.
            actions.push(json!({ "type": "block-dirty-bitmap-merge", "data": {
                "node": d.node, "target": SNAP_BITMAP, "bitmaps": [LIVE_BITMAP] } }));
            actions
                .push(json!({ "type": "block-dirty-bitmap-clear", "data": { "node": d.node, "name": LIVE_BITMAP } }));
        }
        q.execute("transaction", json!({ "actions": actions })).map_err(failed)?;
        for d in &def.disks {
            let size = self.size_of(def, d, Some(q))?;
            let fleece = self.fleece_path(def, d);
            if let Some(parent) = fleece.parent() {
                std::fs::create_dir_all(parent).map_err(|e| failed(format!("{}: {e}", parent.display())))?;
            }
            let f = std::fs::File::create(&fleece).map_err(|e| failed(format!("{}: {e}", fleece.display())))?;
            f.set_len(size).map_err(|e| failed(format!("{}: {e}", fleece.display())))?;
            q.execute(
                "blockdev-add",
                json!({ "node-name": fleece_node(d), "driver": "file", "filename": fleece.display().to_string() }),
            )
            .map_err(failed)?;
            q.execute(
                "blockdev-add",
                // A fleece image that cannot grow (its file system full) breaks the snapshot,
                // never the guest's write: QEMU's default fails the write the guest made.
                json!({ "node-name": cbw_node(d), "driver": "copy-before-write", "file": d.node,
                        "target": fleece_node(d), "on-cbw-error": "break-snapshot" }),
            )
            .map_err(failed)?;
            q.execute(
                "qom-set",
                json!({ "path": format!("/machine/peripheral/{}", d.device), "property": "drive", "value": cbw_node(d) }),
            )
            .map_err(failed)?;
            q.execute(
                "blockdev-add",
                json!({ "node-name": access_node(d), "driver": "snapshot-access", "file": cbw_node(d) }),
            )
            .map_err(failed)?;
        }
        Ok(())
    }

    /// Exports the access nodes over QEMU's NBD server and connects to each.
    pub(super) fn export_running(&self, q: &mut Qmp, def: &VmDef) -> Result<Open, BackendError> {
        let sock = self.nbd_socket(&def.name)?;
        let _ = std::fs::remove_file(&sock);
        q.execute(
            "nbd-server-start",
            json!({ "addr": { "type": "unix", "data": { "path": sock.display().to_string() } } }),
        )
        .map_err(failed)?;
        let mut open = Open::default();
        for d in &def.disks {
            q.execute(
                "block-export-add",
                json!({ "type": "nbd", "id": export_id(d), "node-name": access_node(d), "name": d.name,
                        "bitmaps": [{ "node": d.node, "name": SNAP_BITMAP }] }),
            )
            .map_err(failed)?;
            let n = Nbd::connect(&sock, &d.name, &[ALLOCATION, &dirty_context()], QMP_TIMEOUT).map_err(failed)?;
            open.disks.insert(d.name.clone(), Arc::new(Mutex::new(n)));
        }
        Ok(open)
    }

    /// Tears down whatever of the fleecing graph and exports exists (each step tolerates what
    /// is already gone), then checks nothing of ours is left.
    pub(super) fn unfleece(&self, q: &mut Qmp, def: &VmDef) -> Result<(), BackendError> {
        for d in &def.disks {
            ignore_missing(q.execute("block-export-del", json!({ "id": export_id(d), "mode": "hard" })))?;
        }
        // Export deletion completes asynchronously; wait until QEMU lists none of ours.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let exports = q.execute("query-block-exports", json!({})).map_err(failed)?;
            let ours = exports.as_array().is_some_and(|a| {
                a.iter().any(|e| e.get("id").and_then(Value::as_str).is_some_and(|id| id.starts_with("bulwark-exp-")))
            });
            if !ours {
                break;
            }
            if Instant::now() > deadline {
                return Err(failed(format!("{}: QEMU did not delete the NBD exports", def.name)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match q.execute("nbd-server-stop", json!({})) {
            Ok(_) => {}
            Err(e) if e.class() == Some("GenericError") => {} // not running
            Err(e) => return Err(failed(e)),
        }
        let _ = std::fs::remove_file(self.nbd_socket(&def.name)?);
        for d in &def.disks {
            ignore_missing(q.execute("blockdev-del", json!({ "node-name": access_node(d) })))?;
            let path = format!("/machine/peripheral/{}", d.device);
            let drive = q.execute("qom-get", json!({ "path": path, "property": "drive" })).map_err(failed)?;
            if drive.as_str() == Some(cbw_node(d).as_str()) {
                q.execute("qom-set", json!({ "path": path, "property": "drive", "value": d.node })).map_err(failed)?;
            }
            ignore_missing(q.execute("blockdev-del", json!({ "node-name": cbw_node(d) })))?;
            ignore_missing(q.execute("blockdev-del", json!({ "node-name": fleece_node(d) })))?;
            let fleece = self.fleece_path(def, d);
            match std::fs::remove_file(&fleece) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed(format!("cannot remove {}: {e}", fleece.display()))),
            }
        }
        let nodes = q.execute("query-named-block-nodes", json!({ "flat": true })).map_err(failed)?;
        let left: Vec<String> = nodes
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.get("node-name").and_then(Value::as_str))
                    .filter(|n| {
                        def.disks.iter().any(|d| [fleece_node(d), cbw_node(d), access_node(d)].iter().any(|o| o == n))
                    })
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if !left.is_empty() {
            return Err(failed(format!("{}: block nodes left behind: {}", def.name, left.join(", "))));
        }
        Ok(())
    }

    /// Serves the images of a VM that is off through `qemu-nbd` (read-only with the snapshot
    /// bitmap for a backup; writable for a restore) and connects to each.
    pub(super) fn serve_offline(&self, def: &VmDef, writable: bool) -> Result<Open, BackendError> {
        let mut open = Open::default();
        for d in &def.disks {
            let sock = self.nbd_socket(&format!("{}-{}", def.name, d.name))?;
            let _ = std::fs::remove_file(&sock);
            let mut cmd = Command::new("qemu-nbd");
            cmd.arg("-f").arg(&d.format).arg("-x").arg(&d.name).arg("-k").arg(&sock);
            let mut contexts = vec![ALLOCATION.to_owned()];
            if writable {
                cmd.arg("--cache=writeback");
            } else {
                cmd.arg("-r");
                if d.format == "qcow2" {
                    cmd.arg("-B").arg(SNAP_BITMAP);
                    contexts.push(dirty_context());
                }
            }
            cmd.arg(&d.path).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
            let mut child = cmd.spawn().map_err(|e| failed(format!("cannot run qemu-nbd: {e}")))?;
            let ctx: Vec<&str> = contexts.iter().map(String::as_str).collect();
            let deadline = Instant::now() + Duration::from_secs(10);
            let n = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    open.close();
                    return Err(failed(format!("qemu-nbd for {} exited ({status}): {}", d.path.display(), err.trim())));
                }
                match Nbd::connect(&sock, &d.name, &ctx, QMP_TIMEOUT) {
                    Ok(n) => break n,
                    Err(nbd::NbdError::Connect { .. }) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        open.close();
                        return Err(failed(e));
                    }
                }
            };
            open.servers.push(child);
            open.disks.insert(d.name.clone(), Arc::new(Mutex::new(n)));
        }
        Ok(open)
    }
}

/// Does QEMU's block graph have what `def` names (nodes and devices)?
pub fn graph_matches(q: &mut Qmp, def: &VmDef) -> Result<(), QmpError> {
    let nodes = q.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let mut problems = vec![];
    for d in &def.disks {
        if find_node(&nodes, &d.node).is_none() {
            problems.push(format!("disk {}: QEMU has no block node {}", d.name, d.node));
        }
        let path = format!("/machine/peripheral/{}", d.device);
        if q.execute("qom-get", json!({ "path": path, "property": "drive" })).is_err() {
            problems.push(format!("disk {}: QEMU has no device {} with a drive", d.name, d.device));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(QmpError::Protocol { path: def.qmp.clone(), message: problems.join("; ") })
    }
}

pub(super) fn find_node<'a>(nodes: &'a Value, name: &str) -> Option<&'a Value> {
    nodes.as_array()?.iter().find(|n| n.get("node-name").and_then(Value::as_str) == Some(name))
}

/// A QMP error that only says the thing is already gone is no error for a teardown.
pub(super) fn ignore_missing(r: Result<Value, QmpError>) -> Result<(), BackendError> {
    match r {
        Ok(_) => Ok(()),
        Err(QmpError::Command { class, desc, .. })
            if class == "DeviceNotFound"
                || desc.contains("not found")
                || desc.contains("Cannot find")
                || desc.contains("does not exist") =>
        {
            Ok(())
        }
        Err(e) => Err(failed(e)),
    }
}

pub(super) fn remove_bitmap_online(q: &mut Qmp, node: &str, name: &str) -> Result<(), BackendError> {
    ignore_missing(q.execute("block-dirty-bitmap-remove", json!({ "node": node, "name": name })))
}

/// `qemu-img info --output=json` of an image nobody else may be writing.
pub(super) fn image_info(path: &Path, format: &str) -> Result<Value, BackendError> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U", "-f", format])
        .arg(path)
        .output()
        .map_err(|e| failed(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(failed(format!(
            "qemu-img info {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| failed(format!("qemu-img info {}: {e}", path.display())))
}

/// The bitmaps of a qcow2 image: (name, in use — i.e. inconsistent when no QEMU has it open).
pub(super) fn offline_bitmaps(path: &Path) -> Result<Vec<(String, bool)>, BackendError> {
    let info = image_info(path, "qcow2")?;
    let list = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .and_then(|d| d.get("bitmaps"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Ok(list
        .iter()
        .filter_map(|b| {
            let name = b.get("name")?.as_str()?.to_owned();
            let in_use = b
                .get("flags")
                .and_then(Value::as_array)
                .is_some_and(|f| f.iter().any(|x| x.as_str() == Some("in-use")));
            Some((name, in_use))
        })
        .collect())
}

/// Runs `qemu-img ARGS… IMAGE BITMAP`.
pub(super) fn qemu_img(args: &[&str], image: &Path, bitmap: &str) -> Result<(), BackendError> {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(image)
        .arg(bitmap)
        .output()
        .map_err(|e| failed(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(failed(format!(
            "qemu-img {} {} {bitmap}: {}",
            args.join(" "),
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
