//! The bounded admin surface with a big catalog: 100,000 job records and 20,000 VMs, put
//! straight into the catalog through the coordinator library before `serve` starts (no agents).
//! `job list` and `vm list` answer every item, in text and as one JSON document; `--limit` and
//! `--after` pages chain to the same list; the job history retention purges what is past its
//! age and count but keeps each VM's newest job; text output escapes control characters.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_coordinator::catalog::{Catalog, JobKind, JobRecord, JobState};
use bulwark_protocol::messages::{DiskInfo, GuestOs, Inventory, PowerState, VmInfo};
use bulwark_protocol::{DiskId, VmId};
use common::*;
use std::path::Path;
use std::time::Duration;

const JOBS: u64 = 100_000;
const VMS: usize = 20_000;
const HOSTS: usize = 20;

fn now() -> u64 {
    bulwark_coordinator::catalog::now_secs()
}

/// `[jobs] keep` and `keep_count` in a fresh data directory's coordinator.toml.
fn set_retention(dir: &Path, keep: &str, keep_count: u64) {
    let path = dir.join("coordinator.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("keep = \"30days\"") && text.contains("keep_count = 10000"), "{text}");
    let text = text
        .replace("keep = \"30days\"", &format!("keep = \"{keep}\""))
        .replace("keep_count = 10000", &format!("keep_count = {keep_count}"));
    std::fs::write(&path, text).unwrap();
}

fn vm_name(i: usize) -> String {
    format!("vm{i:05}")
}

/// Job `id` of VM `vm`, succeeded a minute after the one before: the newest finished now.
fn job(id: u64, vm: Option<String>) -> JobRecord {
    let at = now() - (JOBS - id) * 60;
    JobRecord {
        state: JobState::Succeeded,
        started_at: Some(at),
        finished_at: Some(at),
        bytes_scanned: id,
        ..JobRecord::queued(id, if vm.is_some() { JobKind::Sync } else { JobKind::Verify }, vm)
    }
}

/// Job records into the catalog of `dir`, in batches.
fn put_jobs(catalog: &Catalog, jobs: impl Iterator<Item = JobRecord>) {
    let jobs: Vec<_> = jobs.collect();
    for batch in jobs.chunks(10_000) {
        catalog.put_jobs(batch).unwrap();
    }
}

/// 20,000 VMs reported by 20 hosts, as their agents' inventories would.
fn put_vms(catalog: &Catalog) {
    for h in 0..HOSTS {
        let vms = (h * VMS / HOSTS..(h + 1) * VMS / HOSTS)
            .map(|i| VmInfo {
                id: VmId::new(format!("00000000-0000-4000-8000-{i:012x}")).unwrap(),
                name: vm_name(i),
                power: PowerState::Running,
                os: GuestOs::Linux,
                integration_services: true,
                disks: vec![DiskInfo { name: DiskId::new("os").unwrap(), size_bytes: 1 << 30 }],
                change_generation: None,
                owner: None,
            })
            .collect();
        catalog
            .apply_inventory(&format!("node{h:02}"), &Inventory { vms, partition: vec![] }, now(), &|_| true, 4096)
            .unwrap();
    }
    catalog.flush().unwrap();
}

/// Every page of `args` with `--limit N`, chained through `--after`: the items, in order.
fn chain_pages(c: &Cluster, args: &[&str], limit: u32) -> (Vec<serde_json::Value>, usize) {
    let mut items = vec![];
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let limit = limit.to_string();
        let mut all = args.to_vec();
        all.extend_from_slice(&["--limit", &limit]);
        if let Some(a) = &after {
            all.extend_from_slice(&["--after", a]);
        }
        let page = c.json(&all);
        pages += 1;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => {
                assert!(page["next"].is_null(), "next is a cursor or null: {}", page["next"]);
                return (items, pages);
            }
        }
    }
}

fn text(c: &Cluster, args: &[&str]) -> String {
    let out = c.run(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn job_list_and_vm_list_answer_100000_jobs_and_20000_vms_in_pages() {
    let c = Cluster::start_with(|dir| {
        set_retention(dir, "100years", 10_000_000);
        let catalog = Catalog::open(&dir.join("catalog")).unwrap();
        put_vms(&catalog);
        put_jobs(
            &catalog,
            (1..=JOBS).map(|id| {
                let mut j = job(id, Some(vm_name((id % VMS as u64) as usize)));
                if id == JOBS {
                    // A reason an agent could have sent: terminal escapes and a forged log line.
                    j.state = JobState::Failed;
                    j.error = Some("boom\x1b[2J\x1b]0;pwned\x07\nINFO forged line".into());
                }
                j
            }),
        );
    });

    // One JSON document each, every item, jobs in id order.
    let jobs = c.json(&["job", "list"]);
    let ids: Vec<u64> = jobs.as_array().unwrap().iter().map(|j| j["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=JOBS).collect::<Vec<_>>());
    let vms = c.json(&["vm", "list"]);
    let mut names: Vec<String> =
        vms.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names.len(), VMS);
    names.sort();
    names.dedup();
    assert_eq!(names, (0..VMS).map(vm_name).collect::<Vec<_>>());

    // The tables: a header and one line per item.
    let table = text(&c, &["job", "list"]);
    assert_eq!(table.lines().count(), JOBS as usize + 1);
    assert!(table.lines().next().unwrap().contains("BYTES SCANNED"));
    assert!(!table.contains('\x1b'));
    let table = text(&c, &["vm", "list"]);
    assert_eq!(table.lines().count(), VMS + 1);

    // Pages chain to the same lists (a limit over the maximum is cut to it).
    let (paged, pages) = chain_pages(&c, &["job", "list"], 7_000);
    assert!(pages >= 15, "{pages} pages");
    assert_eq!(paged.iter().map(|j| j["id"].as_u64().unwrap()).collect::<Vec<_>>(), ids);
    let (paged, pages) = chain_pages(&c, &["vm", "list"], 1_000_000);
    assert!(pages >= 2, "at most 10,000 VMs a page ({pages} pages)");
    assert_eq!(&paged, vms.as_array().unwrap());
    let page = c.json(&["job", "list", "--limit", "3"]);
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let rest = c.json(&["job", "list", "--after", page["next"].as_str().unwrap()]);
    assert_eq!(rest.as_array().unwrap().len(), JOBS as usize - 3, "--after alone lists the rest as one document");

    // A filter scans the whole tree in bounded pages: the 5 jobs of one VM.
    let (mine, _) = chain_pages(&c, &["job", "list", "--vm", "vm00042"], 2);
    assert_eq!(
        mine.iter().map(|j| j["id"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![42, 20_042, 40_042, 60_042, 80_042]
    );
    let refused = c.run(&["job", "list", "--limit", "5", "--after", "not-a-cursor"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.starts_with("error: ") && err.contains("cursor") && err.lines().count() == 1, "{err}");

    // Control characters are escaped in text and JSON-escaped in JSON.
    let shown = text(&c, &["job", "show", &JOBS.to_string()]);
    assert!(!shown.contains('\x1b') && !shown.contains('\x07'), "{shown:?}");
    assert!(shown.contains("boom\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\u{a}INFO forged line"), "{shown}");
    assert_eq!(shown.lines().filter(|l| l.contains("forged")).count(), 1);
    let json = c.json(&["job", "show", &JOBS.to_string()]);
    assert_eq!(json["error"], "boom\x1b[2J\x1b]0;pwned\x07\nINFO forged line");

    let status = c.json(&["status"]);
    println!(
        "paging: {JOBS} jobs and {VMS} VMs listed; coordinator RSS {} MiB, catalog {} MiB",
        c.coordinator.rss_kib() / 1024,
        status["catalog_bytes"].as_u64().unwrap() >> 20
    );
}

#[test]
fn job_records_past_the_retention_are_purged_but_each_vms_newest_stays() {
    let c = Cluster::start_with(|dir| {
        set_retention(dir, "30days", 30_000);
        let catalog = Catalog::open(&dir.join("catalog")).unwrap();
        put_jobs(
            &catalog,
            (1..=JOBS).map(|id| match id {
                // A VM whose last job is 69 days old: it keeps that one.
                1 | 2 => job(id, Some("lonely".into())),
                // Store maintenance jobs belong to no VM.
                3 | 4 => job(id, None),
                _ => job(id, Some(vm_name((id % VMS as u64) as usize))),
            }),
        );
    });
    wait_until("a retention pass", Duration::from_secs(180), || {
        c.coordinator.log_text().contains("job history: retention pass finished")
    });
    // Past 30 days (ids below ~56,800) and then over the count, the oldest went first; 30,000
    // records stay, the lonely VM's newest among them.
    let ids: Vec<u64> =
        c.json(&["job", "list"]).as_array().unwrap().iter().map(|j| j["id"].as_u64().unwrap()).collect();
    let want: Vec<u64> = std::iter::once(2).chain(70_002..=JOBS).collect();
    assert_eq!(ids.len(), 30_000);
    assert_eq!(ids, want);
    let gone = c.run(&["job", "show", "1"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no job 1"));
    // New jobs still get new ids.
    let started = c.json(&["verify"]);
    assert!(started["job_id"].as_u64().unwrap() > JOBS);
}
